"""Fine-tuning: arguments, trainer, the run, the rehearsal, the memory plan, the launch."""
