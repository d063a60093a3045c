# Reinforcement learning on verifiable rewards (rollouts.py) for the cpu_demo model fine-tuned on 2-digit
# addition for 300 steps (about 40% exact match, half way through learning the task): every step samples 8
# replies to each of 16 prompts of tasks.py's train split, rewards the right sums and reinforces them.
#   python train.py config/sft_add2.py --max_iters=300 --lr_decay_iters=300 --out_dir=out/sft300_add2
#   python train.py config/grpo_add2.py
#   python eval.py --ckpt out/grpo_add2 --task addition --digits 2 --n 500
# data_dir is the SFT data, for its tokenizer and the val loss (how far the policy drifts from that data).
init_from = "out/sft300_add2"
data_dir = "data/add2"
out_dir = "out/grpo_add2"

objective = "grpo"
task = "addition"
task_difficulty = 2
group_size = 8
batch_size = 32  # replies per forward: 4 micro-batches make a step of 128 replies, 16 prompts
gradient_accumulation_steps = 4
max_new_tokens = 8  # a sum of two 2-digit numbers and the closing <|im_end|> take 2 to 4
temperature = 1.0

max_iters = 400
lr_decay_iters = 400
warmup_iters = 10
learning_rate = 1e-4  # a twentieth of pretraining's: at 2e-4 the KL to the start grew fastest where rewards were rarest
min_lr = 1e-5
weight_decay = 0.0  # decay would pull the fine-tuned weights toward 0, which no reward asks for

eval_interval = 50
eval_iters = 5
eval_problems = 200
log_interval = 1
