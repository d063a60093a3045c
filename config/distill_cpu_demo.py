# White-box distillation: a student half as wide as config/cpu_demo.py learns from the cpu_demo model's
# distributions as well as from the data's next tokens (objectives.distillation_loss):
#   python train.py config/cpu_demo.py                  # the teacher, out/cpu_demo
#   python train.py config/distill_cpu_demo.py          # the student
#   python train.py config/distill_cpu_demo.py --objective=lm --teacher= --out_dir=out/student_ce   # CE alone
# The student: 4 layers, 128 wide, 64-dim heads as the teacher's (~0.8M parameters besides the 0.8M embedding);
# the same data, windows, steps and schedule as cpu_demo, so the two runs differ in their targets only.
out_dir = "out/distill_cpu_demo"
data_dir = "data/pystdlib"
objective = "distill"
teacher = "out/cpu_demo"
distill_alpha = 0.5  # half the data's tokens, half the teacher's distribution
distill_alpha_final = 0.5
distill_temperature = 1.0

n_layer = 4
n_head = 2
n_kv_head = 1
n_embd = 128
block_size = 256

batch_size = 16
max_iters = 350
lr_decay_iters = 350
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-4

eval_interval = 50
eval_iters = 10
log_interval = 10
