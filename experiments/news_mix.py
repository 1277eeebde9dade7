"""A public text of two genres: the Lee news corpus that the gensim wheel ships as test data (lee_background.cor,
300 Australian news articles) interleaved with the Wikipedia sample the demo's cache holds (enwiki.train.txt),
each news article followed by Wikipedia lines of about its length (characters), then the rest of Wikipedia. What
it measures: how much a second public genre (news, PTB's) moves the emulator and the plug-in at the default fit.

    python experiments/news_mix.py ENWIKI_TRAIN LEE_BACKGROUND OUT.txt
"""
import sys

wiki = [line for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
news = [line.rstrip("\n") + "\n" for line in open(sys.argv[2], encoding="utf-8") if line.strip()]
out, w = [], 0
for doc in news:
    out.append(doc)
    n = 0
    while n < len(doc) and w < len(wiki):
        out.append(wiki[w])
        n, w = n + len(wiki[w]), w + 1
out += wiki[w:]
with open(sys.argv[3], "w", encoding="utf-8") as f:
    f.write("".join(out))
print(f"{len(news)} news articles, {w} Wikipedia lines among them, {sum(map(len, out))} characters")
