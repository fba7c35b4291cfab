"""edgesmith.distill"""
