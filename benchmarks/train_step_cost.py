"""Peak memory and time of one training micro-batch (forward + backward) at SmolLM2-135M-Instruct's
sizes, on random inputs (no model download, no data): the loss formulations the recipes choose from.

  eagle3 --loss chunked   the EAGLE-3 step loss as training runs it (eagle3_losses: each step's loss
                          through loss.ChunkedLinearCrossEntropy, gradients formed chunk by chunk)
  eagle3 --loss plain     every unrolled step's full [N, draft_vocab] logits kept for backward (the
                          loss before issue 19; the tests' reference)
  heads  --soft W         4 Medusa heads over an 8,192-token vocabulary, soft-target share W (0: tokens
                          only); --cached-lse gives them the base logsumexp a cache stores

One configuration per process, so its peak RSS (ru_maxrss) is its own. Run each alone on a quiet host:

  python benchmarks/train_step_cost.py eagle3 --loss chunked --steps 7
  python benchmarks/train_step_cost.py eagle3 --loss plain --steps 7
  python benchmarks/train_step_cost.py heads --soft 0.5 --cached-lse
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from transformers import LlamaConfig

from medusaforge.drafters.draft_vocab import vocab_maps
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.training.eagle3_loss import eagle3_losses, plain_step_loss, step_positions
from medusaforge.training.loss import SoftTargets, full_log_normaliser, medusa_head_losses

VOCAB, HIDDEN, DRAFT_VOCAB = 49152, 576, 8192


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def eagle3_step(args, batch: int, length: int) -> float:
    base_config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    draft = Eagle3Draft(draft_config_from_base(base_config, DRAFT_VOCAB, (2, 15, 27)), torch.nn.Embedding(VOCAB, HIDDEN))
    draft.set_vocab(*vocab_maps(torch.arange(DRAFT_VOCAB) * 6, VOCAB))
    ids, mask = torch.randint(0, VOCAB, (batch, length)), torch.rand(batch, length) > 0.4
    features, target_logits = torch.randn(batch, length, 3 * HIDDEN), torch.randn(batch, length, DRAFT_VOCAB)
    print(f"set up: peak RSS {peak_gib():.2f} GiB")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hiddens = draft.unroll(ids, draft.fuse(features), args.steps)
        if args.loss == "chunked":
            result = eagle3_losses(draft, hiddens, target_logits, torch.randint(0, VOCAB, (batch, length)), mask)
            loss = sum(0.8**k * s / c for k, (s, c) in enumerate(zip(result.loss_sums, result.counts)))
        else:
            loss = 0
            for k, hidden in enumerate(hiddens):
                rows, positions = step_positions(mask, k).nonzero(as_tuple=True)
                loss = loss + 0.8**k * plain_step_loss(draft.logits(hidden[rows, positions]), target_logits[rows, positions + 1 + k]) / len(rows)
    loss.backward()
    return time.perf_counter() - start


def heads_step(args, batch: int, length: int) -> float:
    lm_head = torch.randn(VOCAB, HIDDEN) * 0.02
    heads = MedusaHeads(HIDDEN, VOCAB, num_heads=4, num_layers=1, head_vocab_size=DRAFT_VOCAB)
    heads.token_map.copy_(torch.arange(DRAFT_VOCAB) * 6)
    heads.init_from_base(lm_head)
    hidden, ids, mask = torch.randn(batch, length, HIDDEN), torch.randint(0, VOCAB, (batch, length)), torch.rand(batch, length) > 0.4
    soft = None
    if args.soft > 0:
        cached = full_log_normaliser(hidden.flatten(0, 1), lm_head, torch.float32).view(batch, length) if args.cached_lse else None
        soft = SoftTargets(lm_head, args.soft, cached)
    print(f"set up: peak RSS {peak_gib():.2f} GiB")
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = medusa_head_losses(heads, hidden, ids, mask, 512, soft=soft)
    sum(s / c for s, c in zip(result.loss_sums, result.counts)).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("problem", choices=("eagle3", "heads"))
    parser.add_argument("--loss", choices=("chunked", "plain"), default="chunked")
    parser.add_argument("--steps", type=int, default=7, help="EAGLE-3 training-time-test steps")
    parser.add_argument("--soft", type=float, default=0.0, help="heads: soft-target share")
    parser.add_argument("--cached-lse", action="store_true", help="heads: the base logsumexp comes from a cache")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="micro-batches timed (the first includes warm-up)")
    args = parser.parse_args()
    torch.manual_seed(0)
    step = eagle3_step if args.problem == "eagle3" else heads_step
    seconds = [step(args, args.batch, args.length) for _ in range(args.repeats)]
    print(f"{args.problem} {vars(args)}: seconds per micro-batch {' '.join(f'{s:.2f}' for s in seconds)}, "
          f"peak RSS {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
