use std::time::Duration;

use umbra_policies::{IdentityId, MaxConnections, Name, Throughput};

use super::*;

fn key(id: &str, policy: &str) -> Key {
    (
        IdentityId::new(id).unwrap(),
        Name::new("svc").unwrap(),
        Name::new(policy).unwrap(),
    )
}

fn one_stream() -> Throughput {
    Throughput {
        connections: Some(MaxConnections::try_from(1).unwrap()),
        ..Throughput::default()
    }
}

fn rate() -> Throughput {
    Throughput {
        rate: Some("1/s".parse().unwrap()),
        ..Throughput::default()
    }
}

/// Opens one stream on each key's book, as `admit` does, and puts the books back.
fn open(table: &mut Table, keys: &[Key], limits: Throughput, now: Duration) -> Result<(), Refused> {
    let mut taken = table.take(keys.iter().map(|k| (k.clone(), limits)).collect(), now)?;
    for (_, e) in &mut taken {
        assert!(e.book.try_open(&limits, now).is_ok());
    }
    table.put_back(taken);
    Ok(())
}

#[test]
fn the_table_is_bounded_and_refuses_when_every_book_is_busy() {
    let now = Duration::ZERO;
    let mut table = Table::new(2);
    open(&mut table, &[key("a", "p")], one_stream(), now).unwrap();
    open(&mut table, &[key("b", "p")], one_stream(), now).unwrap();
    assert_eq!(table.len(), 2);
    // Both books hold an open stream: nothing can be forgotten, so a third is refused.
    assert_eq!(
        open(&mut table, &[key("c", "p")], one_stream(), now),
        Err(Refused::Full)
    );
    assert_eq!(table.len(), 2);
    // A known key still gets its book (refused by its own limit, not by the table's).
    let taken = table
        .take(vec![(key("a", "p"), one_stream())], now)
        .unwrap();
    assert_eq!(taken.len(), 1);
    table.put_back(taken);
    // Once a stream ends its book is idle and makes room, at the next scan.
    table.entries.get_mut(&key("a", "p")).unwrap().book.close();
    open(&mut table, &[key("c", "p")], one_stream(), now + SCAN_PAUSE).unwrap();
    assert_eq!(table.len(), 2);
    assert!(!table.entries.contains_key(&key("a", "p")));
}

#[test]
fn a_book_with_a_bucket_still_filling_is_not_forgotten() {
    let mut table = Table::new(1);
    open(&mut table, &[key("a", "p")], rate(), Duration::ZERO).unwrap();
    table.entries.get_mut(&key("a", "p")).unwrap().book.close();
    // Its token is spent: forgetting it would give "a" a fresh token early.
    let soon = Duration::from_millis(500);
    assert_eq!(
        open(&mut table, &[key("b", "p")], rate(), soon),
        Err(Refused::Full)
    );
    let later = Duration::from_secs(1);
    open(&mut table, &[key("b", "p")], rate(), later).unwrap();
    assert!(table.entries.contains_key(&key("b", "p")));
}

#[test]
fn books_come_out_in_the_order_asked() {
    let mut table = Table::new(10);
    open(&mut table, &[key("a", "q")], one_stream(), Duration::ZERO).unwrap();
    let keys = vec![(key("a", "p"), rate()), (key("a", "q"), one_stream())];
    let taken = table.take(keys, Duration::ZERO).unwrap();
    let names: Vec<&str> = taken.iter().map(|(k, _)| k.2.as_str()).collect();
    assert_eq!(names, ["p", "q"]);
    assert_eq!(taken[1].1.book.open(), 1);
    assert_eq!(taken[0].1.limits, rate());
}

#[tokio::test]
async fn a_freed_slot_forgets_its_idle_book() {
    let books = GrantBooks::new(4);
    let k = key("a", "p");
    {
        let mut t = books.lock();
        open(&mut t, std::slice::from_ref(&k), one_stream(), books.now()).unwrap();
    }
    let slot = GrantSlot {
        books: Arc::clone(&books),
        key: k,
        shaper: None,
    };
    assert_eq!(books.len(), 1);
    drop(slot);
    assert_eq!(books.len(), 0);
}

#[test]
fn a_full_table_of_busy_books_is_scanned_once_a_pause_not_once_a_stream() {
    let now = Duration::from_secs(1);
    let mut table = Table::new(2);
    open(&mut table, &[key("a", "p")], one_stream(), now).unwrap();
    open(&mut table, &[key("b", "p")], one_stream(), now).unwrap();
    let refused = (0..1_000)
        .filter(|i| {
            let k = key(&format!("new-{i}"), "p");
            open(&mut table, &[k], one_stream(), now) == Err(Refused::Full)
        })
        .count();
    assert_eq!(refused, 1_000);
    assert_eq!(table.scans, 1);
    // Known keys are not held up by the pause.
    let taken = table
        .take(vec![(key("a", "p"), one_stream())], now)
        .unwrap();
    table.put_back(taken);
    // After the pause, the next new book scans again (and finds room once a stream ended).
    table.entries.get_mut(&key("b", "p")).unwrap().book.close();
    open(&mut table, &[key("c", "p")], one_stream(), now + SCAN_PAUSE).unwrap();
    assert_eq!(table.scans, 2);
}
