# Supervised fine-tuning of the cpu_demo model on 2-digit addition (tasks.py), about 8 minutes on 2 CPU cores:
#   python tasks.py --task addition --digits 2 --n 20000 --split train --out add2_train.jsonl
#   python prepare_data.py --chat --input add2_train.jsonl --tokenizer out/cpu_demo/tokenizer.model --out data/add2
#   python train.py config/sft_add2.py                     # LoRA instead: add --lora_rank=8 --learning_rate=3e-3
#   python eval.py --ckpt out/sft_add2 --task addition --digits 2 --n 500
# The model's shape (block_size too) comes from init_from; a step is 16 windows of 256 tokens, ~160 problems.
init_from = "out/cpu_demo"
data_dir = "data/add2"
out_dir = "out/sft_add2"

batch_size = 16
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
learning_rate = 1e-3  # half the pretraining peak: the weights move toward the task, not away from what they know
min_lr = 1e-4

eval_interval = 100
eval_iters = 5
log_interval = 10
