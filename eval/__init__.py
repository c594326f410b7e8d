"""Evaluation commands, run after training (each prints JSON and saves it under RUN_DIR/eval/):

    python -m eval.bpb --ckpt RUN          bits per byte over a whole split
    python -m eval.generate --ckpt RUN --prompt TEXT    streamed sampling
    python -m eval.probes --ckpt RUN       character-level probes on held-out words
    python -m eval.robustness --ckpt RUN   bits per byte under character noise
    python -m eval.compare RUN...          one markdown table and plots across runs
"""
