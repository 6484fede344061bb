//! The mock legacy bank of the bank example: balances and transactions
//! change every few seconds; there are no webhooks, only polling.
//!
//! `cargo run --example mock-bank -- --listen 127.0.0.1:8081 --accounts 3 --every 3s`

mod bank;

use rand::Rng;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let listen = arg("--listen", "127.0.0.1:8081");
    let n: usize = arg("--accounts", "3").parse().expect("--accounts N");
    let every = humantime::parse_duration(&arg("--every", "3s")).expect("--every <duration>");
    let ids: Vec<String> = (1..=n).map(|i| format!("acc-{i:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut bank = bank::Bank::new(&refs);
    if let Ok(t) = std::env::var("BANK_TOKEN") {
        if !t.is_empty() {
            bank = bank.with_token(&t);
        }
    }
    let addr = bank.serve(&listen).await;
    println!(
        "[bank] legacy bank API on http://{addr} ({n} accounts, changes every {})",
        humantime::format_duration(every)
    );
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut rng = rand::rng();
        let acc = &ids[rng.random_range(0..ids.len())];
        if rng.random_bool(0.6) {
            let k = rng.random_range(1..=3);
            let amounts: Vec<i64> = (0..k).map(|_| rng.random_range(-15_000..10_000)).collect();
            let booked = bank.book(acc, &amounts);
            println!(
                "[bank] {acc}: booked {} -> balance {:.2}",
                booked.join(", "),
                bank.balance(acc) as f64 / 100.0
            );
        } else {
            // A balance change without a transaction (a hold, a correction),
            // sometimes below the low threshold of 100.00.
            let cents = if rng.random_bool(0.3) {
                rng.random_range(1_000..9_900)
            } else {
                rng.random_range(10_000..120_000)
            };
            bank.set_balance(acc, cents);
            println!("[bank] {acc}: balance set to {:.2}", cents as f64 / 100.0);
        }
    }
}
