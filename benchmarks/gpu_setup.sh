# Source this on the lent GPU machine (its image has torch but not soundfile, soxr, pystoi, pesq,
# espeakng-loader): installs the wheels carried in .whl/ and makes the demo corpus.
#   source benchmarks/gpu_setup.sh [MINUTES]
# Wheels for the machine's Python (cp312): soundfile with cffi and pycparser, soxr, pystoi,
# espeakng-loader. pesq ships no wheels: carry its sdist (pesq-*.tar.gz) with the Cython,
# setuptools and pytest-runner (its setup_requires) wheels, and it is built here once (the image
# has a C compiler and numpy).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if ! python3 -c "import pesq" 2>/dev/null && ls .whl/pesq-*.tar.gz >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .whl/pesq-*.tar.gz
fi
python3 data/demo/prepare.py --minutes "${1:-60}" --seed 0 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
