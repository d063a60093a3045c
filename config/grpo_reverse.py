# Reinforcement learning on verifiable rewards (rollouts.py) for the cpu_demo model fine-tuned on reversing
# 6-letter strings (config/sft_reverse.py, which reaches about 50% exact match): every step samples 8 replies to
# each of 8 prompts of tasks.py's train split, rewards the reversed ones, and reinforces them.
#   python train.py config/grpo_reverse.py
#   python eval.py --ckpt out/grpo_reverse --task reverse --length 6 --n 500
# data_dir is the SFT data, for its tokenizer and the val loss (how far the policy drifts from that data).
init_from = "out/sft_reverse"
data_dir = "data/reverse"
out_dir = "out/grpo_reverse"

objective = "grpo"
task = "reverse"
task_difficulty = 6
group_size = 8
batch_size = 16  # replies per forward: 4 micro-batches make a step of 64 replies, 8 prompts
gradient_accumulation_steps = 4
max_new_tokens = 16  # 6 letters and the closing <|im_end|> take about 8
temperature = 1.0

max_iters = 400
lr_decay_iters = 400
warmup_iters = 10
learning_rate = 2e-4  # a tenth of pretraining's: the signal is a few bits per reply, and the start is good
min_lr = 2e-5
weight_decay = 0.0  # decay would pull the fine-tuned weights toward 0, which no reward asks for

eval_interval = 50
eval_iters = 5
eval_problems = 200
log_interval = 1
