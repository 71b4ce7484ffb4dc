"""seqattn's Quick Start (README.md), end to end: sequences in, flashinfer's page
tables out, attention checked against dense attention. Runs on a CPU in a second.

Run: python examples/quickstart.py
"""

import torch

from seqattn import CacheDescriptor, NoPageError, PagedAttention, PagedKVCacheManager

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 4, 8, 64  # the README's sizes


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = PagedKVCacheManager(
        num_pages=64, page_size=16, num_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        dtype=torch.float16, device=device, num_layers=NUM_LAYERS,
    )  # fmt: skip
    desc = CacheDescriptor(cache)

    # Prefill three prompts; write their K/V into every layer.
    ids, prompt_lens = [1, 2, 3], [100, 150, 80]
    desc.allocate(ids, prompt_lens)
    packed = desc.pack_for_flashinfer(ids, append_lens=prompt_lens)
    keys = torch.randn(sum(prompt_lens), NUM_KV_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
    for layer in range(NUM_LAYERS):
        cache.append_kv(keys, keys, packed, layer=layer)
    print("prefill  indptr", packed.kv_page_indptr.tolist(),
          "last_page_len", packed.kv_last_page_len.tolist())  # fmt: skip

    # Attention over the paged cache (flashinfer on CUDA, plain torch on the CPU),
    # checked against dense causal attention on the same K/V.
    attn = PagedAttention(cache, num_qo_heads=16)
    attn.plan(packed)  # the queries are the tokens just appended
    q = torch.randn(sum(prompt_lens), 16, HEAD_DIM, dtype=torch.float16, device=device)
    out = attn.run(q, layer=0)
    first = slice(0, prompt_lens[0])  # sequence 1: its K/V are keys[:100]
    k = keys[first].float().repeat_interleave(2, dim=1).transpose(0, 1)  # GQA: 2 q per kv
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[first].float().transpose(0, 1), k, k, is_causal=True
    ).transpose(0, 1)
    err = (out[first].float() - dense).abs().max().item()
    print(f"attention ({attn.backend}) vs dense causal attention: max |diff| = {err:.1e}")

    # Ten decode steps: one token per sequence per step.
    for _ in range(10):
        desc.allocate_decoding(ids)
        packed = desc.pack_for_flashinfer(ids, append_lens=[1, 1, 1])
        token_kv = torch.randn(3, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float16, device=device)
        for layer in range(NUM_LAYERS):
            cache.append_kv(token_kv, token_kv, packed, layer=layer)
    print(
        "decode   lengths", desc.seq_lens(ids).tolist(), "free pages", cache.available_pages_count
    )

    # Fork sequence 1 (beam search / parallel sampling): full pages are shared.
    desc.fork(1, 4)
    shared = set(desc.page_indices(1)) & set(desc.page_indices(4))
    print(f"fork     1 -> 4 shares {len(shared)} pages; free pages", cache.available_pages_count)

    # Speculative decoding rollback: keep the first 120 tokens of sequence 2.
    desc.truncate(2, 120)
    print("truncate lengths", desc.seq_lens([1, 2, 3, 4]).tolist())

    # Running out of pages raises before anything changes.
    try:
        desc.allocate([5], [10_000])
    except NoPageError as err:
        print("NoPageError:", err)

    desc.release([1, 2, 3, 4])
    print("release  free pages", cache.available_pages_count, "of", cache.num_pages)
    desc.check_integrity()


if __name__ == "__main__":
    main()
