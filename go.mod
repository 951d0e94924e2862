module github.com/fieldpatch/fieldpatch

go 1.26
