# The seed project's pretraining run (minimind's 26M model): 8 layers, 512 wide, GQA 8/2,
# vocab 6400, context 512, tied embeddings, on 6 GPUs:
#   python prepare_data.py --input pretrain_hq.jsonl --out data/pretrain_hq
#   torchrun --nproc_per_node=6 train.py config/pretrain.py
# About 25.8M parameters. Global batch: 6 micro-batches of 64 x 512 = 196,608 tokens per step,
# so 3,000 steps see about 590M tokens, roughly Chinchilla's 20 tokens per parameter
# (Hoffmann et al. 2022) and one pass over pretrain_hq.jsonl.
out_dir = "out/pretrain"
data_dir = "data/pretrain_hq"

n_layer = 8
n_head = 8
n_kv_head = 2
n_embd = 512
block_size = 512
rope_theta = 1e6
tie_embeddings = True

batch_size = 64
gradient_accumulation_steps = 6  # one micro-batch per GPU on 6 GPUs; 1, 2 or 3 GPUs accumulate more
max_iters = 3000
lr_decay_iters = 3000
warmup_iters = 100
learning_rate = 1e-3  # small models tolerate a higher rate than GPT-3 small's 6e-4
min_lr = 1e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 40
log_interval = 10
compile = True
