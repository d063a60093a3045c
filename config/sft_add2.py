# Supervised fine-tuning of the cpu_demo model on 2-digit addition (tasks.py), about 9 minutes on 2 CPU cores:
#   python tasks.py --task addition --digits 2 --n 20000 --split train --out add2_train.jsonl
#   python prepare_data.py --chat --input add2_train.jsonl --no_near_dedup \
#       --tokenizer out/cpu_demo/tokenizer.model --out data/add2
#   python train.py config/sft_add2.py                     # LoRA instead: add --lora_rank=8 --lora_embeddings=True
#                                                          #   --learning_rate=5e-3 --min_lr=5e-4 --warmup_iters=100
#   python eval.py --ckpt out/sft_add2 --task addition --digits 2 --n 500
# The model's shape (block_size too) comes from init_from; a step is 8 windows of 256 tokens, ~55 problems:
# smaller steps, more of them: 16 windows for 300 steps at 1e-3 got 63% on 2-digit addition in 7.1 minutes,
# 8 windows for 700 steps at 2e-3 got 83% in 7.4 (the answers are learnt late, as the rate decays).
init_from = "out/cpu_demo"
data_dir = "data/add2"
out_dir = "out/sft_add2"

batch_size = 8
max_iters = 800
lr_decay_iters = 800
warmup_iters = 20
learning_rate = 2e-3  # cpu_demo's own peak
min_lr = 2e-4

eval_interval = 300
eval_iters = 5
log_interval = 10
