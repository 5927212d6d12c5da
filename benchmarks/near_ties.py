"""Top-k flips against the fp32 oracle on the benchmark's own weights and inputs, and how near
each flipped token's tie is.

Usage (on an sm90 GPU):
    python benchmarks/near_ties.py --preset nemotron-3-ultra --tokens 512 --draws 4

Builds the layer as ``python -m autotune bench`` does (seed 0), then for each of ``--draws``
input draws in the order the benchmark makes them (the first is the benchmark's when ``--tokens``
is the first token count it runs) prints the relative error against the fp32 oracle, the tokens
whose top-k set differs from the oracle's, the error without those tokens, and for each flipped
token the k-th and (k+1)-th choice values in fp64 and the experts each side picked alone.
"""

from __future__ import annotations

import argparse

import torch

from autotune.benchmark import _build_module
from autotune.fused import cutlass_forward
from autotune.peers import module_inputs
from autotune.problem import preset
from autotune.reference import latent_moe_reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nemotron-3-ultra")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="the benchmark's --seed")
    args = ap.parse_args()
    p = preset(args.preset)
    module, error = _build_module(p, args.seed, "cuda")
    if error:
        raise SystemExit(error)
    (gate, bias, fc1, up, down, fc2), routing = module_inputs(module)
    for draw in range(args.draws):
        x = torch.randn(args.tokens, p.hidden_size, device="cuda", dtype=torch.bfloat16)
        ours, theirs = [], []
        with torch.no_grad():
            out = cutlass_forward(x, gate, bias, up, down, fc1_latent_proj=fc1,
                                  fc2_latent_proj=fc2, topk_ids_hook=ours.append, **routing)
            ref = latent_moe_reference(x.float(), gate, bias, up, down, fc1_latent_proj=fc1,
                                       fc2_latent_proj=fc2, topk_ids_hook=theirs.append,
                                       **routing)
        a, b = ours[0].sort(1).values, theirs[0].sort(1).values
        flipped = ~(a == b).all(1)
        diff, ref = out.float() - ref.float(), ref.float()
        kept = ~flipped
        print(f"{args.preset} T={args.tokens} draw {draw}: rel err "
              f"{(diff.norm() / ref.norm()).item():.3e}, flipped tokens {int(flipped.sum())}, "
              f"rel err without them {(diff[kept].norm() / ref[kept].norm()).item():.3e}")
        logits = x.double() @ gate.double().T
        score = torch.sigmoid(logits) if p.scoring == "sigmoid" else torch.softmax(logits, -1)
        choice = score + (bias.double() if bias is not None else 0.0)
        for t in flipped.nonzero().flatten().tolist():
            v = choice[t].sort(descending=True).values
            k = p.top_k
            mine = sorted(set(a[t].tolist()) - set(b[t].tolist()))
            oracle = sorted(set(b[t].tolist()) - set(a[t].tolist()))
            print(f"  token {t}: k-th {v[k - 1]:.9f}, (k+1)-th {v[k]:.9f}, gap "
                  f"{float(v[k - 1] - v[k]):.2e}; only ours {mine} "
                  f"{[round(float(choice[t, e]), 9) for e in mine]}, only the oracle's {oracle} "
                  f"{[round(float(choice[t, e]), 9) for e in oracle]}")


if __name__ == "__main__":
    main()
