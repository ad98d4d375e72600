# fp32 token-budget A/B (512 vs the default 768), run alone from the repo root (2026-12-04, code 1d93040)
cd "$(dirname "$0")/../../../../.."
d=docs/bench/cpu/epyc-zen4-dec04b/fp32-token-budget-ab
for r in 1 2; do for b in 512 768; do
  [ -f $d/mbt$b-r$r.log ] && grep -q "Maximum resident" $d/mbt$b-r$r.log && continue
  /usr/bin/time -v .venv/bin/python -m agro.cli train steps=8 precision=fp32 micro_batch_tokens=$b eval_prompts=0 save_every=0 save_final=false plot=false tensorboard=false progress=false overwrite=true output_dir=$d/mbt$b-r$r > $d/mbt$b-r$r.log 2>&1
  rm -rf $d/mbt$b-r$r/checkpoints
done; done
echo done > $d/done
