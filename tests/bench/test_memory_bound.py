"""``benchmarks/memory_bound.py`` on a tiny random Gemma 3 (HF, fp32): a memory holding every token gives
dense's log-probs in both ways of choosing it, and a small memory changes them, so the harness measures
what the memory drops and nothing else."""

import torch

from memory_bound import Memory, run
from sfi_sglang.config import SFIConfig


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=1024)
    return Gemma3ForCausalLM(cfg).eval()


def test_whole_memory_is_dense_and_a_small_one_is_not():
    model, steps = tiny_gemma3(), 24
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    dense = run(model, ids, steps, None)
    for oracle in (False, True):
        whole = run(model, ids, steps, Memory(SFIConfig(topk=512, recent=16), steps, 8, oracle))
        torch.testing.assert_close(whole, dense, rtol=0, atol=1e-5)
        small = run(model, ids, steps, Memory(SFIConfig(topk=8, recent=8), steps, 8, oracle))
        assert (dense.exp() * (dense - small)).sum(-1).mean() > 1e-4
