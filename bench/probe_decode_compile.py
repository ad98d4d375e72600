"""One-off probe (docs/RESULTS.md, "Speed, 2026-12-02 (sixth)"): a functional version of
agro.fast_decode.StaticDecoder.step (cache writes by index_copy_), eager and under torch.compile,
on a SmolLM2-135M-shaped model with random weights, 32 rows.

    PYTHONPATH=src .venv/bin/python bench/probe_decode_compile.py bf16   # or fp32

Run it alone on the machine; compiling takes minutes. Its functional core is the decoder of
2026-12-02 (an fp32 cache over all columns), so the eager arm runs that too (BF16_CACHE off,
no slice: the code of 2026-12-04 decodes bf16 weights on a bf16 cache, bench/decode_cache_ab.py)."""
import torch, time, sys
from transformers import LlamaConfig, LlamaForCausalLM
import agro.fast_decode as fd
from agro.fast_decode import StaticDecoder, _rotate_half
fd.BF16_CACHE, fd.SLICE_COLUMNS = False, 10 ** 9
torch.manual_seed(0)
dt = torch.bfloat16 if sys.argv[1]=="bf16" else torch.float32
cfg=LlamaConfig(hidden_size=576,intermediate_size=1536,num_hidden_layers=30,num_attention_heads=9,num_key_value_heads=3,vocab_size=49152,tie_word_embeddings=True,rms_norm_eps=1e-5,max_position_embeddings=8192, rope_theta=100000)
m=LlamaForCausalLM(cfg).to(dt).eval()
B,P,T=32,70,32
ids=torch.randint(0,49152,(B,P)); am=torch.ones(B,P,dtype=torch.long)
with torch.no_grad():
    out=m(input_ids=ids,attention_mask=am,use_cache=True)
def fresh():
    with torch.no_grad():
        out=m(input_ids=ids,attention_mask=am,use_cache=True)
    return StaticDecoder.from_prefill(m,out.past_key_values,am,T)
def run_eager(sd, steps=30):
    tok=torch.randint(0,49152,(B,)); pos=torch.full((B,),P)
    t=time.perf_counter()
    for s in range(steps):
        lg=sd.step(tok,pos+s)
    return (time.perf_counter()-t)/steps*1e3, lg
# functional core with tensor column index
layers=list(m.model.layers); inner=m.model
def core(tok,pos,c,K,V,mask):
    b=tok.shape[0]
    h=inner.embed_tokens(tok[:,None]); cos,sin=inner.rotary_emb(h,pos[:,None])
    mask.index_fill_(3,c,0.0)
    for i,layer in enumerate(layers):
        att=layer.self_attn
        x=layer.input_layernorm(h)
        q=att.q_proj(x).view(b,-1,64); k=att.k_proj(x).view(b,3,64); v=att.v_proj(x).view(b,3,64)
        q=q*cos+_rotate_half(q)*sin; k=k*cos+_rotate_half(k)*sin
        K[i].index_copy_(3,c,k.float()[...,None]); V[i].index_copy_(2,c,v.float()[:,:,None])
        qg=q.view(b,3,-1,64).float()
        w=torch.matmul(qg,K[i])*att.scaling
        w=torch.softmax(w+mask,dim=-1)
        a=torch.matmul(w,V[i]).reshape(b,1,-1)
        h=h+att.o_proj(a.to(h.dtype))
        h=h+layer.mlp(layer.post_attention_layernorm(h))
    h=inner.norm(h)
    return m.lm_head(h)[:,0]
def run_core(fn, sd, steps=30):
    tok=torch.randint(0,49152,(B,)); pos=torch.full((B,),P)
    t=time.perf_counter()
    with torch.no_grad():
        for s in range(steps):
            lg=fn(tok,pos+s,torch.tensor([P+s]),sd.k,sd.v,sd.mask)
    return (time.perf_counter()-t)/steps*1e3, lg
e1,l1=run_eager(fresh()); e2,_=run_eager(fresh())
c1,l2=run_core(core,fresh())
print(f"{sys.argv[1]} eager step {e1:.1f}/{e2:.1f} ms; functional core eager {c1:.1f} ms; maxdiff {(l1.float()-l2.float()).abs().max():.2e}")
cc=torch.compile(core, dynamic=False)
t=time.perf_counter(); run_core(cc,fresh(),steps=2); print("compile", time.perf_counter()-t)
k1,l3=run_core(cc,fresh()); k2,_=run_core(cc,fresh())
print(f"compiled step {k1:.1f}/{k2:.1f} ms -> {e2/k2:.2f}x; maxdiff {(l1.float()-l3.float()).abs().max():.2e}")
