#!/usr/bin/env bash
# Set up a Python environment for unclip and print the path of its python.
#
# - With a virtual environment active ($VIRTUAL_ENV), installs into it.
# - Otherwise builds (once) a venv cached outside the clone, keyed on the dependency pins:
#   ${UNCLIP_VENV:-$HOME/.cache/unclip/venv-<hash of pyproject.toml and constraints.txt>}.
# - torch: an importable torch already in the environment is kept as it is. Otherwise a matching
#   torch/torchvision pair is installed ($UNCLIP_TORCH overrides, e.g. "torch==2.5.1 torchvision==0.20.1"
#   or a CUDA index: UNCLIP_TORCH="--index-url https://download.pytorch.org/whl/cu124 torch torchvision").
# All progress goes to stderr; the only line on stdout is the python path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[setup] $*" >&2; }

python_bin="${PYTHON:-python3}"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  venv="$VIRTUAL_ENV"
else
  key=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -c1-12)
  venv="${UNCLIP_VENV:-$HOME/.cache/unclip/venv-$key}"
fi
py="$venv/bin/python"
stamp="$venv/.unclip-deps-done"

if [ ! -f "$stamp" ]; then
  if [ ! -x "$py" ]; then
    log "creating virtual environment $venv"
    "$python_bin" -m venv "$venv"
  fi
  "$py" -m pip install -q --upgrade pip >&2
  if "$py" -c "import torch, torchvision" 2>/dev/null; then
    log "keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
  else
    if [ -n "${UNCLIP_TORCH:-}" ]; then
      torch_spec="$UNCLIP_TORCH"
    else
      case "$(uname -m)" in
        aarch64|arm64) torch_spec="torch==2.9.1 torchvision==0.24.1" ;;
        *) torch_spec="torch==2.14.1 torchvision==0.29.1" ;;
      esac
    fi
    log "installing $torch_spec (a few minutes the first time)"
    # shellcheck disable=SC2086
    "$py" -m pip install -q $torch_spec >&2
  fi
  # Pin whatever torch is now installed so that no dependency can replace it.
  keep=$(mktemp)
  "$py" - >"$keep" <<'PY'
from importlib.metadata import version
for name in ("torch", "torchvision"):
    print(f"{name}=={version(name)}")
PY
  log "installing unclip's dependencies"
  "$py" -m pip install -q -c "$keep" -c "$root/constraints.txt" -e "$root[dev]" >&2
  rm -f "$keep"
  touch "$stamp"
fi
# The venv may be shared by several clones: point the editable install at this one (seconds). Asked from /, so
# that a clone in the current directory cannot answer for the installed one (the jobs import the installed one).
if [ "$(cd / && "$py" -c 'import unclip, os; print(os.path.dirname(os.path.dirname(unclip.__file__)))' 2>/dev/null)" != "$root" ]; then
  "$py" -m pip install -q --no-deps -e "$root" >&2
fi
# Best effort, never fatal: data=emoji renders the Noto Color Emoji font. Installed with apt-get when it
# is missing and we are root or have passwordless sudo; UNCLIP_NO_APT=1 skips this.
install_emoji_font() {
  [ "${UNCLIP_NO_APT:-0}" = 1 ] && return 0
  [ -n "${UNCLIP_EMOJI_FONT:-}" ] && [ -f "$UNCLIP_EMOJI_FONT" ] && return 0
  if [ -n "$(find /usr/share/fonts /usr/local/share/fonts "${HOME:-/nonexistent}/.fonts" "${HOME:-/nonexistent}/.local/share/fonts" \
      -name 'NotoColorEmoji*.ttf' -print 2>/dev/null | head -n 1)" ]; then
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      log "the emoji font is missing (for data=emoji): sudo apt-get install fonts-noto-color-emoji"
      return 0
    fi
  fi
  log "installing the emoji font (fonts-noto-color-emoji, for data=emoji)"
  local install="$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji"
  $install >&2 2>/dev/null || { $sudo apt-get update -qq >&2 && $install >&2; } ||
    log "could not install fonts-noto-color-emoji; data=emoji needs it (or UNCLIP_EMOJI_FONT=<NotoColorEmoji.ttf>)"
}
install_emoji_font || true
echo "$py"
