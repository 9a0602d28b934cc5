# One device call of the ViT suite: build the suite from the packed files in .gpu (bench.vit.suite --pack),
# record its digest and package versions, check CorDA on CUDA, then resume the plan within the call.
#   bash bench/vit/device_call.sh            # the main plan (both halves, the size sweep)
#   bash bench/vit/device_call.sh followup   # the follow-up (PREREGISTRATION.md)
#   bash bench/vit/device_call.sh layers     # which layers: VAS ranks by input shift (PREREGISTRATION.md)
#   bash bench/vit/device_call.sh edges      # every label's grid one step past the edge it chose, and anything missing
HALF=${1:-both}
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p $OUT/vit
{
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import PIL, skimage, sklearn, numpy, matplotlib as m; print('Pillow', PIL.__version__, 'skimage', skimage.__version__, 'sklearn', sklearn.__version__, 'numpy', numpy.__version__, 'matplotlib', m.__version__)"
if [ ! -f .vit_suite/suite.npz ]; then timeout 120 python3 -m bench.vit.suite .gpu .vit_suite/suite.npz --digest $OUT/vit/suite-digest.txt; fi
python3 -m pytest -q -p no:cacheprovider bench/tests/test_quality.py -k corda 2>&1 | tail -2
} > $OUT/vit/device-check.txt 2>&1
cat $OUT/vit/device-check.txt
timeout -k 5 $((568-SECONDS)) python3 -m bench.vit.run $HALF $([ $HALF = both ] && echo --sizes) --workers 15 --out $OUT/vit --resume bench/results/vit/runs*.jsonl.xz > $OUT/vit/log.txt 2>&1
tail -3 $OUT/vit/log.txt; wc -l $OUT/vit/runs.jsonl
