# Sourced by the other scripts: create .venv on first use and install the project into it.
# torch is pinned to 2.13.0 and installed first, because an unpinned install pulls a multi-GB CUDA build.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, numpy, watchdog, yaml, pytest, hypothesis, watcher, trainer' 2>/dev/null; then
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e '.[trainer,test]'
fi
export PATH="$PWD/.venv/bin:$PATH"
