"""One training loop for baseline, fine-tuning, distillation and QAT (`edgecv.train.loop.fit`), its
optimizers and schedules, and torchrun / DDP support."""
