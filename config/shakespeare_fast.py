# Added to config/shakespeare_cpu.py: the levers that helped in bench/levers.py (its table in bench/RESULTS.md).
#   python train.py config/shakespeare_cpu.py config/shakespeare_fast.py --data_dir=...
#   python bench/shakespeare.py --input tinyshakespeare.txt --nanogpt path/to/nanoGPT
# Muon on the blocks' matrices, q/k norm, the ReLU^2 MLP, an untied head and a WSD schedule; twice the batch at twice
# the rate: Newton-Schulz costs the same per step whatever the batch, so larger steps spend less of the time on it.
out_dir = "out/shakespeare_fast"

qk_norm = True
hidden_act = "relu2"
tie_embeddings = False

batch_size = 32
max_iters = 280
lr_decay_iters = 280
warmup_iters = 20
optimizer = "muon"
learning_rate = 4e-3
min_lr = 4e-4
lr_schedule = "wsd"

eval_interval = 40
log_interval = 40
