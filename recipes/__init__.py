"""edgesmith.recipes"""
