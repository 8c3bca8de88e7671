"""Writes the tiny Hugging Face Mixtral fixtures of test/data/hf_mixtral with transformers.

    python scripts/hf_fixture.py OUT_DIR      (scripts/check-hf.sh runs it in its venv)

OUT_DIR/classic: MixtralForCausalLM.save_pretrained (hub naming: block_sparse_moe.experts.E.w1..3)
OUT_DIR/fused:   the model's own state_dict through safetensors (transformers 5's fused experts:
                 mlp.experts.gate_up_proj [E, 2F, H], mlp.experts.down_proj [E, H, F], mlp.gate)

Every in-memory tensor named N holds BASE[N] + (flat index) / 1024, so a reader can check each
element against a formula (test/unit/interop/hf_fixture_test.cpp writes the same formulas).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

BASE = {  # per in-memory tensor of layer L: BASE + 10·L
    "model.embed_tokens.weight": 1, "lm_head.weight": 2, "model.norm.weight": 3,
    "input_layernorm.weight": 4, "post_attention_layernorm.weight": 5,
    "self_attn.q_proj.weight": 6, "self_attn.k_proj.weight": 7, "self_attn.v_proj.weight": 8,
    "self_attn.o_proj.weight": 9, "mlp.gate.weight": 10, "mlp.experts.gate_up_proj": 11,
    "mlp.experts.down_proj": 12,
}


def base_of(name):
    if name in BASE:
        return BASE[name]
    parts = name.split(".")  # model.layers.L.<rest>
    return BASE[".".join(parts[3:])] + 100 * int(parts[2])


def main(out):
    cfg = MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                        num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=32,
                        rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        sliding_window=None)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(base_of(name) + torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / 1024)
    model.save_pretrained(os.path.join(out, "classic"))
    os.remove(os.path.join(out, "classic", "generation_config.json"))
    os.makedirs(os.path.join(out, "fused"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "fused", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "fused", "config.json"), "w") as f:
        f.write(open(os.path.join(out, "classic", "config.json")).read())


if __name__ == "__main__":
    main(sys.argv[1])
