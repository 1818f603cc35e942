#!/usr/bin/env bash
# why the benchmark's fastlm step is slower than profile_step's on the same shape.
set -u
R=/tmp/res; mkdir -p $R
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
avail() { python3 -c "import os; print('avail GiB', round(os.sysconf('SC_AVPHYS_PAGES')*os.sysconf('SC_PAGE_SIZE')/2**30,1))"; }
avail; free -g | head -2
prof() { timeout 80 python benchmarks/profile_step.py --shape gemma-2b --system fastlm --rows 5 > $R/$1.txt 2>&1; echo "$1: $(grep ^wall $R/$1.txt)"; }
bench() { timeout 80 python benchmarks/train_bench.py --child-timeout 75 --out $R/$1 --shapes gemma-2b --systems fastlm --steps $2 > $R/$1.out 2>&1; echo "$1: $(grep '^\[lora' $R/$1.out)"; }
prof profile-1; avail
bench bench-10 10; avail
bench bench-5 5
prof profile-2; avail; free -g | head -2
