"""edgesmith.bench"""
