"""`mod-generate`: autoregressive sampling from a checkpoint, with a KV cache and causal MoD routing.

    mod-generate --checkpoint runs/demo/checkpoints [--iter N | --iter latest] \\
        --prompt "Once upon a time" --max-new-tokens 50 [--greedy | --temperature 0.8 --top-p 0.9] --seed 0

Any checkpoint of mod-train loads, whatever TP/PP/EP/DP/ZeRO layout wrote it (its layout-free
``model/`` directory; see ``mod_train.inference.loader``). Each MoD layer routes every new token by
its causal decision above the threshold calibrated during training (``mod_train.inference.decoder``).
Several ``--prompt``: those of one token length are decoded together as one batch.

This module is the command line only; the logic lives in ``mod_train.inference``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from mod_train.checkpoint.read import CheckpointReadError
from mod_train.inference.errors import InferenceError
from mod_train.inference.generation import generate_batch
from mod_train.inference.loader import load_for_generation
from mod_train.inference.sampling import Sampling


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mod-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (runs/<run>/checkpoints) or an iter_* dir")
    p.add_argument("--iter", default="latest", help="step to load, or 'latest' (default)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (empty: start from the end-of-document token); repeat for several "
                        "prompts: those of one token length are decoded together as a batch")
    p.add_argument("--max-new-tokens", type=int, default=50)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="override data.tokenizer_model of the checkpoint's config")
    p.add_argument("--show-routing", action="store_true", help="also print per-MoD-layer routed-token counts")
    return p


def _run(args, sampling: Sampling) -> None:
    loaded = load_for_generation(args.checkpoint, args.iter, args.tokenizer)
    tokenizer = loaded.tokenizer
    texts = args.prompt or [""]
    prompts = [list(tokenizer.tokenize(t)) if t else [] for t in texts]
    prompts = [p or [tokenizer.eod] for p in prompts]
    by_length: dict = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    outputs: List[str] = [""] * len(prompts)
    for group in by_length.values():
        result = generate_batch(loaded.model, loaded.config, [prompts[i] for i in group], args.max_new_tokens,
                                greedy=sampling.greedy, temperature=sampling.temperature, top_p=sampling.top_p,
                                seed=sampling.seed, eod=tokenizer.eod, vocab_size=loaded.config.model.vocab_size)
        for row, i in enumerate(group):
            new_ids = result.tokens[row]
            shown = new_ids[:-1] if new_ids and new_ids[-1] == tokenizer.eod else new_ids
            # Detokenize prompt and continuation together so word boundaries come out right.
            text_ids = shown if prompts[i] == [tokenizer.eod] else prompts[i] + shown
            outputs[i] = tokenizer.detokenize(text_ids)
            if args.show_routing:
                for layer_number, routed in result.routed_counts(row).items():
                    print(f"[prompt {i + 1}, layer {layer_number}: {routed}/{result.positions} tokens routed]",
                          file=sys.stderr)
    print("\n-----\n".join(outputs))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mod_train.distributed.world_of_one import SingleProcessError, world_of_one

    args = _parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise SystemExit("mod-generate: --max-new-tokens must be >= 0")
    try:
        # Checked before the model is loaded: a bad --temperature/--top-p fails at once.
        sampling = Sampling(greedy=args.greedy, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        with world_of_one():
            _run(args, sampling)
    except (InferenceError, CheckpointReadError, SingleProcessError) as e:
        raise SystemExit(f"mod-generate: error: {e}") from None
    return 0


if __name__ == "__main__":
    # Here, not in main(): tests call main() in-process. Dependency warnings summed up in one line.
    from mod_train.tracking.console import configure_console

    configure_console(program="mod-generate")
    sys.exit(main())
