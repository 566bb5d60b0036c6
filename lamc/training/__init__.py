"""Running a training plan (`lamc train`): one process per pipeline stage on
torch.distributed (gloo), the stages split from the source module by
torch.distributed.pipelining at the plan's cuts, LoRA adapters through peft."""
