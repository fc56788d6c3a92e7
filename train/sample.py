"""Generate images from prompts: `python train/sample.py pipeline.path=outputs/demo/pipeline prompts='[a red circle]'`.

Writes each image as PNG, a grid (one row per prompt), and samples.jsonl (prompt, seed, settings per image).
"""

from __future__ import annotations

import json
from pathlib import Path

from _job import hydra_job

from unclip.images import save_grid
from unclip.jobs import Job
from unclip.pipeline import UnCLIPPipeline


@hydra_job("train_sample")
def main(job: Job) -> None:
    config, run_dir = job.config, job.run_dir
    prompts = list(config["prompts"] or [])
    if config["prompts_file"]:
        lines = Path(config["prompts_file"]).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    pipe = UnCLIPPipeline.from_config(config["pipeline"])
    n = config["num_images_per_prompt"]
    images = pipe.generate(prompts, n, seed=config["seed"], rerank=config["rerank"])
    image_dir = run_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "samples.jsonl", "w", encoding="utf-8") as log:
        for i, image in enumerate(images):
            name = f"{i:04d}.png"
            image.save(image_dir / name)
            record = {"file": f"images/{name}", "prompt": prompts[i // n], "seed": config["seed"],
                      "index_in_prompt": i % n, "rerank": config["rerank"], "settings": vars(pipe.settings)}
            log.write(json.dumps(record) + "\n")
    grid = save_grid(images, run_dir / "grid.png", columns=n)
    job.finish({"images": len(images), "grid": str(grid)})


if __name__ == "__main__":
    main()
