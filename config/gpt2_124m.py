# A GPT-2-small-sized model (Radford et al. 2019: 12 layers, 12 heads, 768 wide, 1,024 tokens of context),
# the usual yardstick for training throughput (nanoGPT, llm.c), for bench/parallel.py's MFU on a GPU:
#   python bench/parallel.py --gpu
# With GPT-2's 50,257-token vocabulary padded to 50,304 (a multiple of 64 keeps the head's matmul on fast
# tiles) it has 123.5M parameters: SwiGLU at the default 8/3 x 768 = 2,048 has the parameters of GPT-2's
# 4 x 768 GELU MLP, RoPE replaces the learned positions and there are no biases. The vocabulary comes from
# the data when train.py runs it: python train.py config/gpt2_124m.py --data_dir=...
out_dir = "out/gpt2_124m"

n_layer = 12
n_head = 12
n_kv_head = 12
n_embd = 768
block_size = 1024
tie_embeddings = True

batch_size = 16
gradient_accumulation_steps = 32  # 16 x 1,024 x 32 = 524,288 tokens per step, GPT-2 small's batch
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
max_iters = 19000
lr_decay_iters = 19000
weight_decay = 0.1
grad_clip = 1.0
compile = True
