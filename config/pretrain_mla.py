# The seed's pretraining run with DeepSeek's multi-head latent attention in place of GQA, applied on top
# of config/pretrain.py (config files apply in order):
#   torchrun --nproc_per_node=6 train.py config/pretrain.py config/pretrain_mla.py
# DeepSeek-V3's head shapes at this width: 8 heads of 64 + 32 (rope) dims for q.k and 64 for v; keys and
# values come from a 128-dim latent per token, queries from a 192-dim one. 23.08M parameters without
# embeddings, against 22.55M for GQA. The KV cache holds 128 + 32 numbers per token and layer instead of
# GQA's 2 x 2 heads x 64 = 256 (MHA's: 1,024): 5,120 bytes per token in fp32 instead of 8,192.
out_dir = "out/pretrain_mla"

attn = "mla"
q_lora_rank = 192
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
