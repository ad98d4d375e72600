"""One-off probe (docs/RESULTS.md, "Speed, 2026-12-02 (sixth)"): attention over a decode cache,
fp32, one layer, in six formulations against the two batched matmuls agro runs.

    .venv/bin/python bench/probe_attention.py

Run it alone on the machine."""
import torch, time
torch.manual_seed(0)
def bench(fn, reps=200):
    for _ in range(10): fn()
    t=time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter()-t)/reps*1e6
for b,cap in ((32,102),(32,200),(8,102)):
    q=torch.randn(b,3,3,64); K=torch.randn(30,b,3,64,cap)[7]; V=torch.randn(30,b,3,cap,64)[7]
    Kn=K.transpose(-1,-2).contiguous()  # [b,3,cap,64]
    mask=torch.zeros(b,1,1,cap)
    def bmm():
        w=torch.softmax(torch.matmul(q,K)*0.125+mask,-1); return torch.matmul(w,V)
    def mulsum():
        w=(q.unsqueeze(-1)*K.unsqueeze(2)).sum(-2)*0.125
        w=torch.softmax(w+mask,-1)
        return (w.unsqueeze(-1)*V.unsqueeze(2)).sum(-2)
    def mulsum2():  # keys not transposed [b,3,cap,64]
        w=(q.unsqueeze(3)*Kn.unsqueeze(2)).sum(-1)*0.125
        w=torch.softmax(w+mask,-1)
        return (w.unsqueeze(-1)*V.unsqueeze(2)).sum(-2)
    def einsum():
        w=torch.einsum('bkgd,bkdc->bkgc',q,K)*0.125
        w=torch.softmax(w+mask,-1); return torch.einsum('bkgc,bkcd->bkgd',w,V)
    def sdpa():
        # expand kv to 9 heads via enable_gqa
        return torch.nn.functional.scaled_dot_product_attention(q.reshape(b,9,1,64), Kn, V, attn_mask=mask, enable_gqa=True, scale=0.125)
    def bmm_flat():
        # per row b: [9,64] @ ... no; treat as [b*3, 3, 64] @ [b*3, 64, cap]
        w=torch.bmm(q.reshape(b*3,3,64), K.reshape(b*3,64,cap))*0.125
        w=torch.softmax(w.view(b,3,3,cap)+mask,-1)
        return torch.bmm(w.view(b*3,3,cap), V.reshape(b*3,cap,64))
    ref=bmm()
    for name,f in (("bmm",bmm),("mulsum",mulsum),("mulsum2",mulsum2),("einsum",einsum),("sdpa",sdpa),("bmm_flat",bmm_flat)):
        out=f().reshape(ref.shape)
        print(f"b={b} cap={cap} {name}: {bench(f):.0f} us  err {(out-ref).abs().max():.1e}")
