"""unclip: DALL-E 2 (unCLIP) from separately trainable stages."""
