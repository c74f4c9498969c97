# Sourced by the bundled model's recipes: the one definition of its training phantoms.
# bundled_phantoms DIR: 90 phantoms (seeds 1000-1089) on three grids (three size buckets, three
# spacings) into DIR, unless DIR already holds them.
bundled_phantoms() {
    [ -f "$1/datalist.jsonl" ] || maisi2 phantom --count 90 \
        --shape 128 128 96 --spacing 3 3 3 --shape 96 96 64 --spacing 4 4 4 \
        --shape 128 128 64 --spacing 3 3 4.5 --seed 1000 --out "$1"
}
