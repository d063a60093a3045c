# Tiny Shakespeare on a 2-core CPU, to compare with nanoGPT's CPU result in bits per byte:
#   python bench/shakespeare.py --input tinyshakespeare.txt
# (it prepares the first 90% / last 10% of the text with a 1,024-token tokenizer and runs this.)
# nanoGPT's character model sees 64 characters of context; a 1,024-token BPE covers ~2.4 bytes a
# token, so the same width of model sees ~300 characters in a 128-token block, and a whole step of
# 16 x 128 tokens costs about what nanoGPT's 12 x 64 characters cost, per byte of text.
out_dir = "out/shakespeare_cpu"
data_dir = "data/shakespeare"

n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
block_size = 128

batch_size = 16
max_iters = 450
lr_decay_iters = 450
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4

eval_interval = 150
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
