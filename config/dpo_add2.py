# Direct Preference Optimization (preferences.py) for the cpu_demo model fine-tuned on 2-digit addition for 300
# steps (config/sft_add2.py --max_iters=300 --lr_decay_iters=300, the start of config/grpo_add2.py too): each pair
# prefers a right sum to one of the model's own wrong ones. Plain DPO (dpo_nll_weight=0) makes both replies less
# likely and the model worse at the task (bench/RESULTS.md): here with RPO's cross-entropy term on the chosen reply.
#   python train.py config/sft_add2.py --max_iters=300 --lr_decay_iters=300 --out_dir=out/sft300_add2
#   python eval.py --ckpt out/sft300_add2 --task addition --digits 2 --split train --n 2000 --samples 4 \
#       --temperature 1 --replies samples_train.jsonl
#   python tasks.py --task addition --digits 2 --split train --n 2000 --pairs samples_train.jsonl \
#       --out add2_pairs_train.jsonl                    # and the same two with --split test --n 500 for val
#   python train.py config/dpo_add2.py
# data_dir is the SFT data, for its tokenizer and the val loss (how far the policy drifts from that data).
init_from = "out/sft300_add2"
data_dir = "data/add2"
out_dir = "out/dpo_add2"

objective = "dpo"
dpo_pairs = "add2_pairs_train.jsonl"
dpo_val_pairs = "add2_pairs_test.jsonl"
dpo_beta = 0.1
dpo_nll_weight = 1.0

batch_size = 16  # pairs per forward (32 sequences)
gradient_accumulation_steps = 2
max_iters = 400
lr_decay_iters = 400
warmup_iters = 10
learning_rate = 3e-4  # a seventh of pretraining's (at 1e-4, 250 steps: 83.6% held-out preference accuracy)
min_lr = 3e-5
weight_decay = 0.0  # decay would pull the fine-tuned weights toward 0, which no preference asks for

eval_interval = 50
eval_iters = 5
log_interval = 10
