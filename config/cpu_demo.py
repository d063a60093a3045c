# A model that writes Python, trained on one 2-core CPU in about 10 minutes:
#   python prepare_data.py                      # the standard library's sources -> data/pystdlib
#   python train.py config/cpu_demo.py
#   python sample.py --ckpt out/cpu_demo --prompt "def "
# 4 layers, 256 wide: ~3M parameters besides the 1.6M embedding; ~2,500 tokens/s in fp32 here,
# so 350 steps of 4,096 tokens (1.4M tokens, a seventh of the corpus) take about 10 minutes.
out_dir = "out/cpu_demo"
data_dir = "data/pystdlib"

n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 256
block_size = 256

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 350
lr_decay_iters = 350
warmup_iters = 20
learning_rate = 2e-3  # a small model on a short schedule takes a high rate (nanoGPT's shakespeare_char: 1e-3)
min_lr = 2e-4

eval_interval = 50
eval_iters = 10
log_interval = 10
