# The H100 learning proofs, started in the background (setsid) so they outlive one device call:
#   codec:       train_codec.py --config small on the demo corpus for 15.5 minutes;
#   transformer: once the codec has a checkpoint (and at least 4 minutes in), a frozen snapshot of
#                it encodes the corpus, then stage=quantizer (quantizer + resynthesizer) and
#                stage=lm (LM on the frozen quantizer), `small` preset, ~2.5 minutes each.
# Logs: /tmp/proof/{codec,transformer}.log. Source benchmarks/gpu_setup.sh first.
mkdir -p /tmp/proof
setsid nohup python3 train_codec.py --config small device=cuda wandb=disabled num_workers=6 max_steps=20000 \
    warmup_steps=200 eval_interval=250 save_interval=250 log_interval=50 max_minutes=15.5 \
    checkpoint_dir=checkpoints/codec_proof > /tmp/proof/codec.log 2>&1 < /dev/null &
setsid nohup bash -c '
  start=$(date +%s)
  until [ -f checkpoints/codec_proof/best.safetensors ] && [ $(( $(date +%s) - start )) -ge 240 ]; do sleep 5; done
  cp checkpoints/codec_proof/best.safetensors /tmp/proof/codec_snapshot.safetensors
  echo "codec snapshot after $(( $(date +%s) - start )) s: $(grep -o "step [0-9]*: val mel[^|]*" /tmp/proof/codec.log | tail -1)"
  C="--config small device=cuda codec_checkpoint=/tmp/proof/codec_snapshot.safetensors seq_len=256 batch_size=32 \
     max_steps=400 warmup_steps=40 learning_rate=6e-4 min_lr=6e-5 eval_interval=50 save_interval=400 log_interval=25 \
     wandb=disabled compile=false sample_seconds=0 max_minutes=2.5"
  python3 train_transformer.py $C stage=quantizer checkpoint_dir=checkpoints/proof-q
  python3 train_transformer.py $C stage=lm init_from=checkpoints/proof-q/best.safetensors checkpoint_dir=checkpoints/proof-lm
  echo TRANSFORMER_PROOF_DONE
' > /tmp/proof/transformer.log 2>&1 < /dev/null &
echo "learning proofs started"
