"""The PyTorch eager side of bench/peers/peers.sh, on one thread (fp32, eager attention).

  torch_side.py demo HF_DIR STEPS   the demo model (moefold convert --to hf of a moefold-train
                                    checkpoint, so the same weights), AdamW steps of a global
                                    batch of 16 sequences of 64 tokens in microbatches of 2, as
                                    moefold-train runs it; prints the median tokens/s
  torch_side.py moe T H F           transformers' MixtralSparseMoeBlock (8 experts, top-2) on T
                                    tokens, forward + backward; prints the median tokens/s
"""
import statistics
import sys
import time

import torch


def demo(hf_dir, steps):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                               attn_implementation="eager")
    model.config.output_router_logits = True  # the auxiliary loss, as moefold-train trains
    model.config.router_aux_loss_coef = 0.01
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    global_batch, micro, seq = 16, 2, 64
    rates = []
    for step in range(steps):
        ids = torch.randint(0, vocab, (global_batch, seq), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for m in range(0, global_batch, micro):
            chunk = ids[m:m + micro]
            out = model(input_ids=chunk, labels=chunk)
            (out.loss * micro / global_batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds = time.perf_counter() - t0
        if step >= 2:  # warm-up steps excluded, as on the moefold side
            rates.append(global_batch * seq / seconds)
    print(f"{statistics.median(rates):.1f}")


def moe(tokens, hidden, ffn):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=8,
                        num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg)
    x = (0.01 * (torch.arange(tokens * hidden) % 97) - 0.4).reshape(1, tokens, hidden)
    x.requires_grad_(True)
    rates = []
    for rep in range(4):
        t0 = time.perf_counter()
        out = block(x)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(y.detach())
        seconds = time.perf_counter() - t0
        if rep >= 1:
            rates.append(tokens / seconds)
    print(f"{statistics.median(rates):.1f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if sys.argv[1] == "demo":
        demo(sys.argv[2], int(sys.argv[3]))
    else:
        moe(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
