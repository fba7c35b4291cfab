module edgesmith/tests/gotemplate

go 1.19
