//! `[auth] auth_user` + `auth_query`: users missing from the userlist are looked up in PostgreSQL, and with only the
//! SCRAM verifier PostgreSQL stores, pgrelay still logs in to the server (keys recovered from the client's proof).

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_missing_from_the_userlist_are_looked_up_with_auth_query() {
    let pg = Pg::start();
    pg.psql("create role app login password 'app-pw'; grant all on schema public to app");
    let relay = Relay::start(&pg, "", "");
    let url = |user: &str, pw: &str| relay.url(user, pw);
    // Without auth_user the userlist is all there is.
    let Err(e) = try_connect(&url("app", "app-pw")).await else { panic!("app is not in the userlist yet") };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let cfg = std::fs::read_to_string(relay.config_path()).unwrap().replace(
        "stats_users = [\"stats\"]",
        "stats_users = [\"stats\"]\nauth_user = \"postgres\"\nauth_cache = \"1s\"",
    );
    std::fs::write(relay.config_path(), cfg).unwrap();
    relay.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let c = connect(&url("app", "app-pw")).await;
    let who: String = c.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "app");
    // Transaction pooling works for it too: a second client of the same user on the pooled server login.
    let c2 = connect(&url("app", "app-pw")).await;
    c2.batch_execute("create table mine(x int); insert into mine values (1)").await.unwrap();
    assert_eq!(c.query_one("select count(*) from mine", &[]).await.unwrap().get::<_, i64>(0), 1);

    let Err(e) = try_connect(&url("app", "wrong")).await else { panic!("wrong password") };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let Err(e) = try_connect(&url("nobody", "x")).await else { panic!("unknown user") };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    // The verifier never reaches the log.
    assert!(!relay.log().contains("SCRAM-SHA-256$"), "{}", relay.log());
}
