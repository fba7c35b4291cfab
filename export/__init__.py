"""edgesmith.export"""
