"""Generate the demo dataset: customer-service chats for a fictional outdoor-gear shop.

The demo and the tests need a chat dataset that is realistic in shape (a system prompt, one to
three user/assistant turns, varied topics and wording), small enough to commit, free of anyone's
personal data, and reproducible byte for byte. So it is generated from templates with a seeded
`random.Random`, and no network. Policies (return window, shipping thresholds, warranty) are the
same in every answer, so a model can actually learn them.

Examples are kept short (mostly 200-700 bytes): the demo tokenizer is byte-level (one token per
byte) and the demo uses maxSeqLength 512.

    python examples/data/make_support_chat.py      # writes support-chat.jsonl and support-chat-eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are Northwind Outfitters' support assistant."

PRODUCTS = [
    "Ridgeline 45L backpack",
    "Trailhead hiking boots",
    "Summit down jacket",
    "Basecamp 2-person tent",
    "Alpine trekking poles",
    "Cascade rain shell",
    "Timberline fleece",
    "Glacier sleeping bag",
    "Canyon trail runners",
    "Driftwood camp chair",
    "Pinecrest merino base layer",
    "Lakeside kayak paddle",
    "Boulder climbing harness",
    "Aurora headlamp",
    "Tundra insulated gloves",
    "Meadow sun hat",
]
CLOTHING = [
    "Summit down jacket",
    "Cascade rain shell",
    "Timberline fleece",
    "Pinecrest merino base layer",
    "Tundra insulated gloves",
    "Meadow sun hat",
]
FOOTWEAR = ["Trailhead hiking boots", "Canyon trail runners"]
CITIES = [
    "Denver",
    "Portland",
    "Austin",
    "Boston",
    "Chicago",
    "Seattle",
    "Phoenix",
    "Atlanta",
    "Minneapolis",
    "Salt Lake City",
    "Toronto",
    "Vancouver",
]
NAMES = ["Maya", "Leo", "Priya", "Sam", "Jonas", "Aisha", "Chen", "Olivia", "Diego", "Hannah", "Tom", "Nora"]
CARRIERS = ["UPS", "FedEx", "USPS"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
SIZES = ["XS", "S", "M", "L", "XL", "XXL"]
DEFECTS = [
    "the zipper split",
    "a seam came apart",
    "the buckle cracked",
    "the sole is peeling",
    "the strap tore",
    "the switch stopped working",
    "a pole section snapped",
]
THANKS = ["Thanks!", "Great, thank you.", "Perfect, thanks a lot.", "OK, that helps.", "Thank you so much!"]
WELCOME = [
    "You're welcome! Enjoy your time outdoors.",
    "Happy to help! Have a great trip.",
    "Glad I could help. Enjoy the trail!",
    "Anytime! Let us know if anything else comes up.",
]


def order_no(r: random.Random) -> str:
    return f"NW-{r.randint(10000, 99999)}"


def _hi(r: random.Random) -> str:
    return r.choice(["", "Hi, ", "Hello, ", "Hey, ", "Good morning, "])


def where_is_order(r):
    o, c, d = order_no(r), r.choice(CARRIERS), r.choice(DAYS)
    user = r.choice(
        [
            f"{_hi(r)}where is my order {o}?",
            f"{_hi(r)}my order {o} hasn't arrived yet.",
            f"Can you check the status of order {o}?",
        ]
    )
    answer = f"Order {o} shipped with {c}. Tracking shows delivery by {d}; the link is in your shipping email."
    follow = (
        "What if it doesn't come by then?",
        "Reply here if it is two days late. We will send a replacement or refund you.",
    )
    return user, answer, [follow]


def cancel_order(r):
    o, p = order_no(r), r.choice(PRODUCTS)
    user = r.choice(
        [
            f"I ordered the {p} by mistake. Can I cancel {o}?",
            f"Please cancel order {o}.",
            f"{_hi(r)}can I still cancel my order {o}?",
        ]
    )
    answer = (
        f"Orders can be cancelled within 2 hours, and {o} still is. I have cancelled it. "
        "The refund reaches your card in 3-5 business days."
    )
    follow = ("Can I order another color instead?", "Yes, just place a new order. Stock is shown on each product page.")
    return user, answer, [follow]


def change_address(r):
    o, city = order_no(r), r.choice(CITIES)
    user = r.choice(
        [f"I moved to {city}. Can I change the address on {o}?", f"{_hi(r)}I put the wrong address on order {o}."]
    )
    answer = (
        f"Order {o} has not shipped yet, so I can change it. Reply with the full new address "
        "and postal code, and I will confirm."
    )
    return user, answer, []


def return_item(r):
    p = r.choice(PRODUCTS)
    user = r.choice(
        [
            f"{_hi(r)}how do I return the {p}?",
            f"The {p} is not what I expected. Can I return it?",
            f"I want to send back my {p}.",
        ]
    )
    answer = (
        "Unused gear can be returned within 60 days. Start the return under Orders and print "
        "the free label. We refund you within 5 business days of receiving it."
    )
    follow = r.choice(
        [
            ("Do I need the original box?", "No, any sturdy box works. Please keep the tags on clothing."),
            (
                "What if I already wore it outside?",
                "Worn items can't be returned. If it is faulty, the 2-year warranty covers it.",
            ),
        ]
    )
    return user, answer, [follow]


def exchange_size(r):
    p, a, b = r.choice(CLOTHING + FOOTWEAR), *r.sample(SIZES, 2)
    user = r.choice(
        [
            f"My {p} in {a} is too small. Can I swap it for {b}?",
            f"{_hi(r)}I need to exchange the {p}, size {a} for size {b}.",
        ]
    )
    answer = (
        f"Yes, exchanges are free within 60 days. Start one under Orders and pick size {b}. "
        "The new size ships when your return is scanned."
    )
    return user, answer, []


def shipping_cost(r):
    city = r.choice(CITIES)
    user = r.choice(
        [
            f"How much is shipping to {city}?",
            f"{_hi(r)}do you offer free shipping?",
            "How long does delivery usually take?",
        ]
    )
    answer = (
        "Standard shipping is free over $75, otherwise $6.95, and takes 3-5 business days. "
        "Express is $14.95 and takes 1-2 days."
    )
    follow = (
        "Do you ship to Canada?",
        "Yes, for a flat $12. Duties are included, so there is nothing to pay on delivery.",
    )
    return user, answer, [follow]


def sizing(r):
    p = r.choice(CLOTHING[:4] + FOOTWEAR)  # garments sized by height, and shoes
    h, sz = r.randint(160, 195), r.choice(SIZES[1:5])
    if p in FOOTWEAR:
        user = f"{_hi(r)}do the {p} run small? I wear a {r.randint(7, 12)} in sneakers."
        answer = (
            f"The {p} run half a size small, so most people go half a size up. Exchanges are free if they don't fit."
        )
    else:
        user = f"I'm {h} cm and usually wear {sz}. Which size of the {p} should I get?"
        answer = f"The {p} has a regular fit, so {sz} should suit you. Go one size up if you layer underneath."
    follow = ("Can I exchange it if it doesn't fit?", "Yes, exchanges of unused items are free within 60 days.")
    return user, answer, [follow]


def warranty(r):
    p, d = r.choice(PRODUCTS), r.choice(DEFECTS)
    months = r.randint(2, 20)
    user = r.choice([f"{_hi(r)}I bought the {p} {months} months ago and {d}.", f"My {p} broke: {d}. Is that covered?"])
    answer = (
        "Sorry about that! Our 2-year warranty covers defects like this. Send a photo and your "
        "order number, and we will repair or replace it for free."
    )
    follow = (
        "How long does a repair take?",
        "Usually 2-3 weeks. If it can't be repaired, we send a replacement right away.",
    )
    return user, answer, [follow]


def payment(r):
    user = r.choice(
        [
            "Which payment methods do you accept?",
            f"{_hi(r)}can I pay with PayPal?",
            "Do you take gift cards?",
            "Can I pay in installments?",
        ]
    )
    answer = (
        "We accept Visa, Mastercard, Amex, PayPal and Northwind gift cards. Orders over $150 "
        "can be split into 4 interest-free payments."
    )
    return user, answer, []


def charged_twice(r):
    o = order_no(r)
    amount = f"${r.randint(25, 400)}.{r.randint(0, 99):02d}"
    user = r.choice(
        [
            f"I was charged twice for order {o}, {amount} each time.",
            f"{_hi(r)}there are two charges of {amount} on my card for {o}.",
        ]
    )
    answer = (
        f"Sorry for the worry. The second {amount} is a pending hold, not a charge, and your "
        "bank releases it within 3 business days. Reply here if it stays longer."
    )
    return user, answer, []


def password(r):
    user = r.choice(
        [f"{_hi(r)}I can't log in to my account.", "I forgot my password.", "The password reset email never arrived."]
    )
    answer = (
        "Use Forgot password on the sign-in page. The reset link is valid for 30 minutes; "
        "check your spam folder if it doesn't arrive."
    )
    follow = (
        "Still nothing in my inbox.",
        "The account may use another email. Send your order number and I will look it up.",
    )
    return user, answer, [follow]


def delete_account(r):
    n = r.choice(NAMES)
    user = r.choice([f"Hi, this is {n}. Please delete my account.", "How do I close my account?"])
    answer = (
        "You can delete it under Settings > Privacy. Order records are kept 7 years for tax law. Deletion is final."
    )
    return user, answer, []


def stock(r):
    p, sz = r.choice(CLOTHING), r.choice(SIZES)
    user = r.choice([f"When will the {p} be back in {sz}?", f"{_hi(r)}is the {p} in size {sz} sold out?"])
    answer = f"The {p} in {sz} should be back in about 2 weeks. Click Notify me on the product page to get an email."
    return user, answer, []


def support_hours(r):
    user = r.choice(["When is your support team available?", f"{_hi(r)}what are your hours?"])
    answer = "We answer chats every day from 7 am to 9 pm Mountain Time. Replies take under an hour."
    return user, answer, []


def gift_wrap(r):
    user = r.choice(["Do you offer gift wrapping?", f"{_hi(r)}can you gift wrap the {r.choice(PRODUCTS)}?"])
    answer = "Yes, gift wrap is $4 per item. Choose it at checkout and add a note if you like."
    return user, answer, []


def price_match(r):
    user = r.choice(["Will you match a lower price?", f"I found the {r.choice(PRODUCTS)} cheaper elsewhere."])
    answer = (
        "We match prices of major US outdoor retailers within 14 days of purchase. Send the link and your order number."
    )
    return user, answer, []


def promo_code(r):
    code = r.choice(["TRAIL", "SUMMIT", "CAMP", "WELCOME"]) + str(r.randint(10, 25))
    user = r.choice([f"My code {code} doesn't work.", f"{_hi(r)}why is {code} rejected at checkout?"])
    answer = "Codes don't apply to sale items and can't be combined. Check its expiry date as well."
    return user, answer, []


def store(r):
    city = r.choice(CITIES)
    user = r.choice([f"Do you have a store in {city}?", f"{_hi(r)}can I pick up my order in {city}?"])
    answer = f"We are online only, so there is no store in {city}. Shipping and returns are free over $75."
    return user, answer, []


def care(r):
    p = r.choice(CLOTHING[:4])
    user = r.choice([f"How do I wash the {p}?", f"{_hi(r)}can the {p} go in the dryer?"])
    answer = f"Wash the {p} cold on a gentle cycle. Tumble dry on low, or hang it to dry."
    return user, answer, []


TOPICS = [
    where_is_order,
    cancel_order,
    change_address,
    return_item,
    exchange_size,
    shipping_cost,
    sizing,
    warranty,
    payment,
    charged_twice,
    password,
    delete_account,
    stock,
    support_hours,
    gift_wrap,
    price_match,
    promo_code,
    store,
    care,
]


def conversation(r: random.Random) -> dict:
    user, answer, follows = r.choice(TOPICS)(r)
    answer += r.choice(["", "", " Anything else I can help with?", " Have a great trip!"])
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    turns = r.choices([1, 2, 3], weights=[55, 35, 10])[0]
    extra = list(follows)
    if turns >= 2 and extra:
        q, a = extra.pop(0)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if len(messages) < 2 * turns + 1:
        messages += [{"role": "user", "content": r.choice(THANKS)}, {"role": "assistant", "content": r.choice(WELCOME)}]
    return {"messages": messages}


def generate(seed: int, count: int, exclude: set[str] = frozenset()) -> list[str]:
    r = random.Random(seed)
    lines: list[str] = []
    seen = set(exclude)
    while len(lines) < count:
        line = json.dumps(conversation(r), ensure_ascii=False)
        if line not in seen:  # no duplicates, and nothing from the training file in the eval file
            seen.add(line)
            lines.append(line)
    return lines


def main() -> None:
    train = generate(seed=20240601, count=300)
    held_out = generate(seed=7, count=40, exclude=set(train))
    (HERE / "support-chat.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (HERE / "support-chat-eval.jsonl").write_text("\n".join(held_out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
