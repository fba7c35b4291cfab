"""edgesmith.finetune"""
