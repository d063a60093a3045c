# The seed's pretraining run with DeepSeek-V3's mixture of experts in place of the dense MLP, applied on
# top of config/pretrain.py (config files apply in order):
#   torchrun --nproc_per_node=6 train.py config/pretrain.py config/pretrain_moe.py
# Each MoE layer holds 16 routed experts of width 352 in 4 groups; a token goes to the best 3 experts
# within its best 2 groups, plus 1 shared expert. 3 + 1 experts of 352 are the dense MLP's 1408, so a
# token uses about the same parameters as in pretrain.py (22.61M active of 71.81M without embeddings,
# against 22.55M dense) while the model holds 3.2x as many. The first layer stays dense, as in DeepSeek.
# Add config/pretrain_mla.py before this file for DeepSeek-V3's whole recipe (MLA + MoE).
out_dir = "out/pretrain_moe"

n_routed_experts = 16
n_shared_experts = 1
num_experts_per_tok = 3
moe_inter_dim = 352
n_group = 4
topk_group = 2
first_k_dense_replace = 1
scoring_func = "sigmoid"
norm_topk_prob = True
routed_scaling_factor = 1.0
bias_update_rate = 1e-3  # DeepSeek-V3's gamma for auxiliary-loss-free balancing
balance_loss_coef = 1e-4  # DeepSeek-V3's alpha for the sequence-wise balance loss
