#!/usr/bin/env bash
# Runs the test suite the way another machine's CPU would compute it.
#
#   tests/run_on_other_kernels.sh CAPABILITY [pytest arguments]
#
# CAPABILITY selects PyTorch's CPU kernels (ATEN_CPU_CAPABILITY): default (no
# vector extensions), avx2, or avx512 where the CPU has it. The tiny profile is
# built afresh under those kernels in artifacts/kernels-CAPABILITY, so the suite
# sees the models that such a machine makes, not this machine's cached ones.
# ONEDNN_MAX_CPU_ISA (e.g. SSE41, AVX2) and OMP_NUM_THREADS are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: $0 default|avx2|avx512 [pytest arguments]" >&2
    exit 2
fi
capability=$1
shift
export ATEN_CPU_CAPABILITY=$capability
export SBTEMPLATE_ARTIFACTS=${SBTEMPLATE_ARTIFACTS:-$PWD/artifacts/kernels-$capability}
# torch does not check that the CPU has the requested kernels (avx512 on a
# CPU without it dies of an illegal instruction later): allow at most the
# kernels torch picks by itself on this CPU.
native=$(env -u ATEN_CPU_CAPABILITY .venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
rank() { case "${1,,}" in default) echo 0 ;; avx2) echo 1 ;; avx512*) echo 2 ;; *) echo 99 ;; esac; }
if [ "$(rank "$capability")" -gt "$(rank "$native")" ]; then
    echo "$0: '$capability' is not among this CPU's kernels (at most $native: default, avx2 or avx512)" >&2
    exit 2
fi
actual=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
echo "Test suite on $actual kernels (ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-native}), artefacts in $SBTEMPLATE_ARTIFACTS"
exec .venv/bin/python -m pytest tests "$@"
