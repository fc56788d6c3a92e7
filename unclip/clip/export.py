"""Export a CLIP stage of ours to open_clip's own layout, so it can be used without unclip.

``python -m unclip.clip.export <clip stage or run dir> <out_dir> [--pt]`` writes

* ``open_clip_model.safetensors``: the weights (EMA weights when the stage has them, as every later stage used);
* ``open_clip_config.json``: ``{"model_cfg", "preprocess_cfg": {"mean", "std", "size"}}`` as on open_clip's hub
  pages, plus ``"unclip": {"space": ...}`` recording the embedding space;
* with ``--pt`` also ``open_clip_model.pt``, a plain state dict for ``open_clip.create_model(name, pretrained=...)``.

open_clip then loads it with ``open_clip.create_model_and_transforms("local-dir:<out_dir>")`` and
``open_clip.get_tokenizer("local-dir:<out_dir>")``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from unclip.checkpoint import load_stage
from unclip.clip.open_clip_encoder import OpenClipEncoder

WEIGHTS = "open_clip_model.safetensors"
WEIGHTS_PT = "open_clip_model.pt"
CONFIG = "open_clip_config.json"


def export_open_clip(clip_checkpoint_dir: str | Path, out_dir: str | Path, *, pt: bool = False) -> Path:
    """Write the CLIP stage at ``clip_checkpoint_dir`` into ``out_dir`` in open_clip's layout; return ``out_dir``."""
    loaded = load_stage(clip_checkpoint_dir, stage="clip")
    encoder = loaded.model
    if not isinstance(encoder, OpenClipEncoder):
        raise TypeError(
            f"{loaded.path} holds a {type(encoder).__name__}, not an open_clip CLIP; only OpenClipEncoder stages "
            "can be exported to open_clip's format"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.model.state_dict().items()}
    config = {
        "model_cfg": encoder.model_cfg,
        "preprocess_cfg": {"mean": list(encoder.image_mean), "std": list(encoder.image_std),
                           "size": encoder.image_size},
        "unclip": {"space": encoder.compute_space().to_dict(), "source": str(loaded.path)},
    }
    _write_atomic(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    if pt:
        _write_atomic(out / WEIGHTS_PT, lambda tmp: torch.save(state, tmp))
    _write_atomic(out / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclip.clip.export", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="a CLIP stage checkpoint or its run directory (e.g. outputs/clip/shapes)")
    parser.add_argument("out_dir", help="directory to write open_clip_model.safetensors and open_clip_config.json")
    parser.add_argument("--pt", action="store_true", help=f"also write {WEIGHTS_PT} (torch.save of the state dict)")
    args = parser.parse_args(argv)
    out = export_open_clip(args.stage, args.out_dir, pt=args.pt)
    print(f"wrote {out}; load it with open_clip.create_model_and_transforms('local-dir:{out.resolve()}')")


if __name__ == "__main__":
    main()
