# fp32 token-budget A/B, run alone from the repo root after bench/cpu_report.sh (2026-12-04 01:13-01:25 UTC)
cd "$(dirname "$0")/../../../../.."
for r in 1 2; do for b in 768 4096; do
  /usr/bin/time -v .venv/bin/python -m agro.cli train steps=8 precision=fp32 micro_batch_tokens=$b eval_prompts=0 save_every=0 save_final=false plot=false tensorboard=false progress=false overwrite=true output_dir=docs/bench/cpu/epyc-zen4-dec03/fp32-token-budget-ab/mbt$b-r$r > docs/bench/cpu/epyc-zen4-dec03/fp32-token-budget-ab/mbt$b-r$r.log 2>&1
  rm -rf docs/bench/cpu/epyc-zen4-dec03/fp32-token-budget-ab/mbt$b-r$r/checkpoints
done; done
echo done > docs/bench/cpu/epyc-zen4-dec03/fp32-token-budget-ab/done
