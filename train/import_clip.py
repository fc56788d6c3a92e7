"""Save an external CLIP as a run's CLIP stage: `python train/import_clip.py name=... clip.path=...`.

The encoder is built from the `clip` config group (conf/clip/hf_local.yaml: a transformers CLIPModel
directory; conf/clip/open_clip_file.yaml: an open_clip architecture with a local weights file) and saved
as `checkpoints/step-00000000` of the run directory with `latest` naming it, like a trained CLIP. A stage
of a transformers CLIPModel reads the model's directory (config and tokenizer) again whenever it is
loaded: keep that directory in place.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.checkpoint import CHECKPOINTS, load_stage, save_run_checkpoint
from unclip.config import build
from unclip.jobs import finish


@hydra.main(version_base=None, config_path="../conf", config_name="import_clip")
def main(cfg: DictConfig) -> None:
    start = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.exists() and not config["overwrite"]:
        raise FileExistsError(f"{checkpoints} already holds a CLIP stage; choose another name or pass overwrite=true")
    encoder = build(config["clip"]).eval()
    space = encoder.compute_space()
    shutil.rmtree(checkpoints, ignore_errors=True)  # only once the new encoder has built
    checkpoint = save_run_checkpoint(run_dir, encoder, stage="clip", space=space, extra={"job": config})
    # What the other jobs will load must be this very space.
    reloaded = load_stage(run_dir, stage="clip").model.compute_space()
    space.check_same(reloaded, f"the imported CLIP {space.name}", f"the stage saved in {checkpoint}")
    finish(run_dir, {
        "space": space.fingerprint, "dim": space.dim, "text_length": space.text_length,
        "image_size": space.image_size, "name": space.name, "checkpoint": str(checkpoint),
        "minutes": (time.time() - start) / 60,
    })


if __name__ == "__main__":
    main()
