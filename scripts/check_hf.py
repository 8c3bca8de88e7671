"""The Hugging Face side of scripts/check-hf.sh: loads a converted moefold checkpoint with
transformers.MixtralForCausalLM and computes the LM loss of moefold-train's first training batch.

    python scripts/check_hf.py HF_DIR DATA_FILE SEED SEQ_LENGTH GLOBAL_BATCH

Prints one line: "hf_loss <float>". The batch is moefold's (include/moefold/train/text_corpus.hpp,
microbatch_data.hpp): the train split is the first floor(0.95·n) bytes of DATA_FILE; stream
sequence i is the SEQ_LENGTH + 1 bytes at offset mix64(mix64(seed ^ 0x7a) ^ i) mod (n_train −
SEQ_LENGTH − 1); inputs are its first SEQ_LENGTH bytes, labels the next byte of each. The
loss is the mean cross-entropy over every token of the batch, computed in float32.
"""
import sys

import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

MASK = (1 << 64) - 1


def mix64(z):  # core/init.hpp: detail::mix64 (SplitMix64's finalizer)
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def batch(data, seed, seq, count):
    n = int(len(data) * (1.0 - 0.05))  # the train split
    span = seq + 1
    rows = []
    for i in range(count):
        start = mix64(mix64(seed ^ 0x7A) ^ i) % (n - span)
        rows.append(list(data[start:start + span]))
    t = torch.tensor(rows, dtype=torch.long)
    return t[:, :seq], t[:, 1:]


def main(hf_dir, data_file, seed, seq, global_batch):
    ids, labels = batch(open(data_file, "rb").read(), int(seed), int(seq), int(global_batch))
    model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                               attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    print(f"hf_loss {loss.item():.9g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
