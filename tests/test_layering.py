"""The models stand on the core alone: importing them loads no training loop (accelerate, ema-pytorch, tqdm) and no
data set, so that a user who only samples, or another project that borrows a model, gets just the model."""

import ast
import subprocess
import sys

from conftest import ROOT

MODELS = ("decoder", "prior", "dvae", "autoregressive")


def test_importing_the_models_loads_no_training_loop_and_no_data_set():
    # torch itself loads tqdm (torch.hub): what counts is what the models add to what `import torch` loads
    script = ("import sys, torch; before = set(sys.modules); "
              "import unclip.dvae, unclip.autoregressive, unclip.decoder, unclip.prior; "
              "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    added = loaded.stdout.split()
    assert "unclip.decoder" in added  # the check sees what the import loads
    unwanted = [m for m in added if m.split(".")[0] in ("accelerate", "ema_pytorch", "tqdm")
                or m.startswith(("unclip.training", "unclip.data"))]
    assert unwanted == []


def _imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_no_model_module_imports_the_training_loop_or_a_data_set():
    files = [path for model in MODELS for path in sorted((ROOT / "unclip" / model).rglob("*.py"))]
    assert len(files) >= 4 * 3
    wrong = {str(path.relative_to(ROOT)): sorted(name for name in _imported(path)
                                                 if name.startswith(("unclip.training", "unclip.data")))
             for path in files}
    assert {path: names for path, names in wrong.items() if names} == {}
