"""Save an external CLIP as a run's CLIP stage: `python train/import_clip.py name=... clip.path=...`.

The encoder is built from the `clip` config group (conf/clip/hf_local.yaml: a transformers CLIPModel
directory; conf/clip/open_clip_file.yaml: an open_clip architecture with a local weights file) and saved
as `checkpoints/step-00000000` of the run directory with `latest` naming it, like a trained CLIP. A stage
of a transformers CLIPModel reads the model's directory (config and tokenizer) again whenever it is
loaded: keep that directory in place.
"""

from __future__ import annotations

import shutil

from _job import hydra_job

from unclip.checkpoint import CHECKPOINTS, load_stage, save_run_checkpoint
from unclip.config import build
from unclip.jobs import Job


@hydra_job("import_clip")
def main(job: Job) -> None:
    checkpoints = job.run_dir / CHECKPOINTS
    if checkpoints.exists() and not job.config["overwrite"]:
        raise FileExistsError(f"{checkpoints} already holds a CLIP stage; choose another name or pass overwrite=true")
    encoder = build(job.config["clip"]).eval()
    space = encoder.compute_space()
    shutil.rmtree(checkpoints, ignore_errors=True)  # only once the new encoder has built
    checkpoint = save_run_checkpoint(job.run_dir, encoder, stage="clip", space=space, extra={"job": job.config})
    # What the other jobs will load must be this very space.
    reloaded = load_stage(job.run_dir, stage="clip").model.compute_space()
    space.check_same(reloaded, f"the imported CLIP {space.name}", f"the stage saved in {checkpoint}")
    job.finish({"space": space.fingerprint, "dim": space.dim, "text_length": space.text_length,
                "image_size": space.image_size, "name": space.name, "checkpoint": str(checkpoint)})


if __name__ == "__main__":
    main()
