"""The real-model demo's task: triage a customer-support ticket into strict JSON.

    user       Hi, my order #482913 still hasn't arrived and it's been 9 days. This is urgent. Thanks, Ana
    assistant  {"category": "shipping", "priority": "high", "order_id": "482913"}

What a support team would fine-tune a small model for: a fixed label set, a field copied out of
the text, and an answer a program parses. The rules are the team's conventions, which a prompt
can name but not teach: the category is what went wrong (a refund of a returned item is
"returns", a charge is "billing"); the priority is "high" or "low" only when the customer says
so (an urgency or a no-rush sentence), "medium" otherwise — and a suspected break-in is always
"high", praise or a suggestion never above "medium"; the order id is the order number's digits, never an
amount or an earlier ticket's number, and null when there is none.

Tickets are written from the sentence lists below, filled with random products, amounts, dates,
names and numbers, all from one seeded `random.Random`: the same seed gives the same tickets.
Every list ends with sentences that only held-out tickets use (the last HELD_OUT_* of each): a
held-out ticket is "new phrasing" when it uses one of them, so the score shows how much of what
SFT taught carries over to wording it never saw, beside tickets that only recombine known
sentences with new fillers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CATEGORIES = ("billing", "shipping", "returns", "account", "technical", "feedback")
PRIORITIES = ("low", "medium", "high")
SYSTEM_PROMPT = (
    "Triage this support ticket as JSON with category (billing, shipping, returns, account, technical or "
    "feedback), priority (low, medium or high) and order_id (digits, or null)."
)

# What went wrong, per category. "{order}" stands for an order reference ("order #482913"); a
# sentence may fix the priority ("high": a break-in) — or cap it, for feedback (see PRIORITY_OF).
PROBLEMS = {
    "billing": (
        "I was charged twice for {order}.",
        "my card was billed {amount} but the total at checkout was {amount2}.",
        "can you send me an invoice for {order}? I need it for my company's expenses.",
        "I cancelled my subscription last month but you charged me {amount} again {when}.",
        "my payment keeps getting declined even though my card works everywhere else.",
        "there is a charge of {amount} on my statement that I don't recognise.",
        "the discount code was not applied to {order}, so I paid {amount} too much.",
        "I was billed for express shipping on {order} but I chose the free option.",
        "why did my monthly plan go up from {amount2} to {amount}?",
        "please update the billing address on my invoices.",
        "I paid for {order} with a gift card, but my credit card was charged as well.",
        "the receipt for {order} is missing my company's VAT number.",
        "my bank shows a pending charge of {amount} from you that never went away.",
        "I'd like to switch my plan from monthly to yearly payments.",
    ),
    "shipping": (
        "{order} still hasn't arrived and it's been {days} days.",
        "the tracking for {order} hasn't updated for {days} days.",
        "{carrier} says my parcel was delivered but there is nothing at my door.",
        "can I change the delivery address for {order}? I'm moving next week.",
        "my {product} was sent to my old address.",
        "only part of {order} arrived; the {product} is missing from the box.",
        "do you ship to Canada, and how long does delivery take?",
        "{carrier} left a note saying they couldn't deliver {order}.",
        "the estimated delivery date for my {product} keeps moving.",
        "I paid for next-day delivery but {order} is taking a week.",
        "the parcel with my {product} has been stuck in customs for {days} days.",
        "the courier keeps missing me; can {order} be left at a pickup point?",
        "my tracking number doesn't work on the {carrier} website.",
        "{carrier} delivered {order} to the wrong house number.",
    ),
    "returns": (
        "I'd like to return the {product} from {order}; it's too small.",
        "the {product} arrived broken. Can I get a replacement?",
        "I sent back {order} {when} and still haven't received my refund.",
        "can I exchange the {product} for a different colour?",
        "how do I get a return label for {order}?",
        "the {product} stopped working after {days} days and I want my money back.",
        "I ordered a {product} but received a {product2} instead.",
        "the {product} looks nothing like the photos, so I want to send it back.",
        "my return was received but the refund was only {amount} instead of {amount2}.",
        "is it too late to return {order}? I bought it {days} days ago.",
        "the {product} has a deep scratch; I'd like a new one or a partial refund.",
        "I want to return a gift I received, but I don't have the receipt.",
        "you sent me two of the {product} by mistake; how do I return one?",
        "the zip on the {product} broke the first time I used it, I want a refund.",
    ),
    "account": (
        "I can't log in; it says my password is wrong even after I reset it.",
        "the password reset email never arrives.",
        "please change the email address on my account to {email}.",
        "I want to delete my account and all the data you hold about me.",
        "I think someone else has been logging into my account; there are orders I didn't place.",
        "my account got locked after too many login attempts.",
        "I lost my phone and can't get the two-factor login code.",
        "how do I merge my two accounts into one?",
        "I keep getting logged out of my account every few minutes.",
        "I'm getting emails for an account I never created, and I got a login alert from another country.",
        "how can I change the name on my profile?",
        "my loyalty points have disappeared from my account.",
        "I can't verify my email address; the link says it has expired.",
        "my account page says my email is already in use when I try to update it.",
    ),
    "technical": (
        "{app} crashes every time I open it on my {device}.",
        "I get an error 500 when I try to check out on your website.",
        "the search in {app} returns no results, even for products I know you sell.",
        "pictures don't load in {app} since the last update.",
        "{app} is extremely slow on my {device}.",
        "I can't add anything to my basket; the button does nothing.",
        "the page goes blank after I enter my card details.",
        "notifications from {app} stopped working on my {device}.",
        "my {product} won't pair with {app}.",
        "my wishlist doesn't sync between {app} and my {device}.",
        "the size filter on the website is broken; it shows every size.",
        "I get 'something went wrong' whenever I try to post a review.",
        "{app} keeps asking me to update, but there's no update available.",
        "the checkout page freezes in {browser} on my {device}.",
    ),
    "feedback": (
        "I just wanted to say the {product} is fantastic.",
        "it would be great if you sold the {product} in more colours.",
        "your delivery driver was very kind and helpful.",
        "could you add a dark mode to {app}?",
        "the new website design is much harder to use than the old one.",
        "I love the {product}, but the instructions were confusing.",
        "your support agent {agent} solved my problem in minutes, thank you.",
        "please consider using less plastic in your packaging.",
        "the {product} I bought last year is still going strong.",
        "I'd like to suggest a student discount.",
        "do you plan to open a shop in {city}?",
        "the product pages could show more measurements.",
        "your prices went up a lot this year, and I'm not happy about it.",
        "the {product} came beautifully wrapped; it made a great gift.",
    ),
}
ALWAYS_HIGH = {"I think someone else has been logging", "I'm getting emails for an account I never created"}

# How the customer says the priority. Medium tickets mostly say nothing; some ask mildly.
CUES = {
    "high": (
        "This is urgent.",
        "Please treat this as urgent.",
        "I need this sorted out today.",
        "We are completely stuck until this is solved.",
        "This is the third time I'm contacting you about this.",
        "Please escalate this, it's really important.",
        "I need an answer as soon as possible.",
        "I'm losing money every day this isn't fixed.",
        "Please respond right away.",
        "URGENT, please help!",
        "I have a deadline tomorrow morning.",
        "I'm very upset and need this resolved immediately.",
        "This can't wait any longer.",
        "Please deal with this straight away.",
    ),
    "low": (
        "No rush.",
        "Not urgent at all.",
        "Whenever you have a moment.",
        "It's not a big deal, just letting you know.",
        "Take your time.",
        "No hurry on this one.",
        "Reply whenever it suits you.",
        "It's only a minor thing.",
        "Happy to wait for an answer.",
        "No need to reply quickly.",
        "This is low priority for me.",
        "Whenever is convenient for you.",
    ),
    "medium": (
        "Could you look into it?",
        "Please let me know.",
        "I'd appreciate a reply this week.",
        "Can someone check this?",
        "Let me know what you find.",
        "What should I do?",
        "Could you help me with this?",
        "Please get back to me.",
    ),
}
HELD_OUT_PROBLEMS = 3  # the last 3 problems of each category appear in held-out tickets only
HELD_OUT_CUES = 2  # the last 2 cues of each priority likewise

GREETINGS = ("Hi,", "Hello,", "Hi there,", "Dear support,", "Hello team,", "Hey,", "Good morning,", "Good evening,", "")
CONTEXTS = (
    "I've been a customer for {years} years.",
    "I ordered a {product} {when}.",
    "I'm writing about a recent purchase.",
    "This is my first time ordering from you.",
    "I bought a {product} as a present.",
    "I use {app} most days.",
    "",
    "",
    "",
)
ORDER_REFS = ("order #{id}", "order {id}", "order number {id}", "order no. {id}", "my order #{id}", "my order {id}")
ORDER_SENTENCES = (
    "My order number is {id}.",
    "Order #{id}.",
    "(Order {id}.)",
    "The order is {id}.",
    "Ref: order {id}.",
)
DISTRACTORS = (
    "My earlier ticket was #{ref}.",
    "Case number {ref} from last time.",
    "You can call me on 07{ref}{ref2}.",
)
CLOSINGS = (
    "Thanks,",
    "Thank you,",
    "Best,",
    "Regards,",
    "Cheers,",
    "Kind regards,",
    "Many thanks,",
    "Best wishes,",
    "",
)

PRODUCTS = (
    "pair of wireless earbuds", "yoga mat", "coffee grinder", "standing desk", "rain jacket", "phone case",
    "smart watch", "backpack", "blender", "desk lamp", "pair of running shoes", "hoodie", "water bottle", "air fryer",
    "office chair", "winter coat", "bluetooth speaker", "electric kettle", "sleeping bag", "laptop stand",
    "wool scarf", "toaster", "pair of hiking boots", "baby monitor", "gaming mouse", "mechanical keyboard",
    "duvet cover", "frying pan", "tent", "bike helmet", "fitness tracker", "suitcase", "denim jacket", "humidifier",
    "vacuum cleaner", "drone", "leather wallet", "picture frame", "camping stove", "tablet cover",
)  # fmt: skip
APPS = ("the app", "your iPhone app", "the Android app", "your website", "the desktop app", "your mobile site")
DEVICES = ("iPhone 13", "Pixel 7", "Samsung tablet", "laptop", "Mac", "Windows PC", "iPad", "Chromebook", "phone")
BROWSERS = ("Firefox", "Safari", "Chrome", "Edge", "Opera")
CARRIERS = ("UPS", "FedEx", "DHL", "the courier", "USPS", "Royal Mail", "DPD", "the postal service")
WHEN = (
    "on Monday", "on Tuesday", "last week", "two days ago", "yesterday", "on the 3rd", "on March 14",
    "last Friday", "ten days ago", "at the weekend", "on June 2", "this morning",
)  # fmt: skip
CITIES = ("Leeds", "Porto", "Austin", "Lyon", "Dublin", "Gdansk", "Denver", "Malaga")
NAMES = (
    "Ana", "Tom", "Priya", "Lukas", "Mei", "Omar", "Sofia", "James", "Fatima", "Jonas", "Elena", "Kwame", "Hannah",
    "Diego", "Yuki", "Chloe", "Ravi", "Marta", "Ben", "Aisha", "Pavel", "Grace", "Mateo", "Ingrid", "Sam", "Leila",
    "Noah", "Zara", "Felix", "Nina", "Oscar", "Amara", "Eva", "Hugo", "Lina", "Arjun", "Rosa", "Ethan", "Maya", "Ivan",
)  # fmt: skip
SURNAMES = ("Silva", "Brown", "Patel", "Meyer", "Chen", "Haddad", "Rossi", "Okafor", "Novak", "Kim", "Garcia", "Berg")


@dataclass(frozen=True)
class Ticket:
    text: str
    category: str
    priority: str
    order_id: str | None
    new_phrasing: bool  # uses a sentence that no training ticket uses

    def answer(self) -> str:
        """The JSON the model is trained to write, keys in a fixed order."""
        return json.dumps({"category": self.category, "priority": self.priority, "order_id": self.order_id})

    def conversation(self, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": self.text}]
        return turns + ([{"role": "assistant", "content": self.answer()}] if with_answer else [])


def split(pool: tuple[str, ...], held_out: int, new_phrasing: bool) -> tuple[str, ...]:
    """The sentences a ticket may use: the seen part of a pool, or (new_phrasing) the held-out part."""
    return pool[len(pool) - held_out :] if new_phrasing else pool[: len(pool) - held_out]


def priority_of(problem: str, category: str, rng: random.Random) -> str:
    """The priority the ticket will have: fixed by a break-in, capped for feedback, else drawn."""
    if problem.startswith(tuple(ALWAYS_HIGH)):
        return "high"
    if category == "feedback":
        return rng.choice(("low", "low", "medium"))
    return rng.choice(PRIORITIES)


def fill(template: str, rng: random.Random, order_id: str | None) -> str:
    """Fill a sentence's slots with random products, amounts, dates, ... (and the order reference)."""
    price = rng.randint(5, 400) + rng.choice((0.99, 0.49, 0.0, 0.5))
    product, product2 = rng.sample(PRODUCTS, 2)
    name = rng.choice(NAMES)
    values = {
        "order": rng.choice(ORDER_REFS).format(id=order_id),
        "id": order_id,
        "amount": f"${price:.2f}",
        "amount2": f"${price * rng.choice((0.5, 0.8, 1.25, 2)):.2f}",
        "when": rng.choice(WHEN),
        "days": str(rng.randint(4, 30)),
        "product": product,
        "product2": product2,
        "app": rng.choice(APPS),
        "device": rng.choice(DEVICES),
        "browser": rng.choice(BROWSERS),
        "carrier": rng.choice(CARRIERS),
        "email": f"{name.lower()}.{rng.choice(SURNAMES).lower()}{rng.randint(1, 99)}@example.com",
        "agent": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "years": str(rng.randint(2, 12)),
        "ref": str(rng.randint(10000, 99999)),
        "ref2": str(rng.randint(10000, 99999)),
    }
    text = template.format(**values)
    return text[:1].upper() + text[1:]


def make_ticket(rng: random.Random, new_phrasing: bool) -> Ticket:
    """One random ticket. new_phrasing: its problem or its priority sentence is a held-out one."""
    category = rng.choice(CATEGORIES)
    new_problem = new_phrasing and rng.random() < 0.7  # else the cue is the new sentence
    problem = rng.choice(split(PROBLEMS[category], HELD_OUT_PROBLEMS, new_problem))
    priority = priority_of(problem, category, rng)
    # Low and high tickets say so; a medium one mostly says nothing, and a break-in needs no "urgent".
    fixed = problem.startswith(tuple(ALWAYS_HIGH))
    says_priority = rng.random() < (0.35 if priority == "medium" or fixed else 1.0) or (
        new_phrasing and not new_problem
    )
    cue = rng.choice(split(CUES[priority], HELD_OUT_CUES, new_phrasing and not new_problem)) if says_priority else ""

    order_id = str(rng.randint(100000, 999999))
    if "{order}" not in problem:  # an order number in a sentence of its own, more often where orders matter
        mentions = category in ("billing", "shipping", "returns")
        order_id = order_id if rng.random() < (0.5 if mentions else 0.1) else None
    sentences = [
        rng.choice(GREETINGS),
        fill(rng.choice(CONTEXTS), rng, order_id),
        fill(problem, rng, order_id),
        fill(rng.choice(ORDER_SENTENCES), rng, order_id) if order_id and "{order}" not in problem else "",
        fill(rng.choice(DISTRACTORS), rng, order_id) if rng.random() < 0.12 else "",
        cue,
    ]
    rng.shuffle(sentences[3:])  # the order number, a distractor and the cue, in any order
    closing = rng.choice(CLOSINGS)
    signature = f"{closing} {rng.choice(NAMES)}".strip() if closing or rng.random() < 0.5 else ""
    text = " ".join(s for s in [*sentences, signature] if s)
    return Ticket(text, category, priority, order_id, new_phrasing)


def make_tickets(seed: int, train: int, heldout: int) -> tuple[list[Ticket], list[Ticket]]:
    """-> (training tickets, held-out tickets), no text in both. Half the held-out ones use new phrasing."""
    rng = random.Random(seed)
    heldout_set = [make_ticket(rng, new_phrasing=i % 2 == 1) for i in range(heldout)]
    seen = {t.text for t in heldout_set}
    train_set: list[Ticket] = []
    while len(train_set) < train:
        ticket = make_ticket(rng, new_phrasing=False)
        if ticket.text not in seen:
            seen.add(ticket.text)
            train_set.append(ticket)
    return train_set, heldout_set


def parse_answer(text: str) -> dict | None:
    """The model's answer as the schema's dict, or None when it is not valid JSON of that schema."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or set(value) != {"category", "priority", "order_id"}:
        return None
    order_ok = value["order_id"] is None or (isinstance(value["order_id"], str) and value["order_id"].isdigit())
    if value["category"] not in CATEGORIES or value["priority"] not in PRIORITIES or not order_ok:
        return None
    return value


def is_exact(answer: str, ticket: Ticket) -> bool:
    """Every field of the answer right (what `score` counts as "exact"), for one ticket."""
    return parse_answer(answer.strip()) == json.loads(ticket.answer())


def score(answers: list[str], tickets: list[Ticket]) -> dict[str, float]:
    """Shares of answers that are schema-valid, right per field, and right in every field ("exact"),
    over all tickets and over the new-phrasing ones."""
    hits: dict[str, list[bool]] = {}
    for answer, ticket in zip(answers, tickets, strict=True):
        parsed = parse_answer(answer.strip())
        expected = json.loads(ticket.answer())
        row = {"valid": parsed is not None, "exact": parsed == expected}
        for key in expected:
            row[key] = parsed is not None and parsed[key] == expected[key]
        for name, hit in row.items():
            hits.setdefault(name, []).append(hit)
        hits.setdefault("exact/seen" if not ticket.new_phrasing else "exact/new", []).append(row["exact"])
    return {name: sum(values) / len(values) for name, values in hits.items()}
